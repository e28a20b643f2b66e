"""qwen3vl_lab.vision_inputs vs transformers' vision_utils helpers and Qwen3-VL vision modules (reference)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel, Qwen3VLVisionRotaryEmbedding  # noqa: E402
from transformers.vision_utils import (  # noqa: E402
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from qwen3vl_lab.config import VisionConfig  # noqa: E402
from qwen3vl_lab.errors import UserError  # noqa: E402
from qwen3vl_lab.vision_inputs import (  # noqa: E402
    build_vision_inputs,
    cu_seqlens,
    interpolation_indices_and_weights,
    num_merged_tokens,
    rotary_cos_sin,
    rotary_inv_freq,
    rotary_position_ids,
)

GRIDS = [
    [1, 18, 24],  # 300x400
    [1, 16, 16],  # smallest default image (256x256)
    [1, 2, 2],  # one merged token
    [1, 68, 120],  # 1080x1920
    [1, 4, 90],  # 32x1000 -> 64x1440, very wide
    [1, 96, 2],  # tall and thin
    [1, 48, 48],  # exactly the learned table
    [1, 100, 60],  # larger than the table
    [2, 8, 8],  # video, t = 2
    [3, 10, 6],  # video, t = 3
]
MULTI = [[1, 18, 24], [2, 8, 8], [1, 4, 6], [1, 2, 2]]


def ref_interp(grid):
    g = torch.tensor(grid).reshape(-1, 3)
    idx, w = get_vision_interpolation_indices_and_weights(g, 48, mode="bilinear", align_corners=True, spatial_merge_size=2)
    return idx.numpy(), w.numpy()


@pytest.mark.parametrize("grid", GRIDS + [MULTI])
def test_interpolation_indices_and_weights_exact(grid):
    ref_idx, ref_w = ref_interp(grid)
    idx, w = interpolation_indices_and_weights(np.asarray(grid))
    assert idx.dtype == np.int64 and w.dtype == np.float32 and idx.shape == ref_idx.shape
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(w, ref_w)  # bit-exact, max diff 0


@pytest.mark.parametrize("grid", GRIDS + [MULTI])
def test_rotary_position_ids_and_cu_seqlens(grid):
    g = torch.tensor(grid).reshape(-1, 3)
    pos = rotary_position_ids(np.asarray(grid))
    assert pos.dtype == np.int64
    np.testing.assert_array_equal(pos, get_vision_position_ids(g, 2).numpy())
    cu = cu_seqlens(np.asarray(grid))
    assert cu.dtype == np.int64
    np.testing.assert_array_equal(cu, get_vision_cu_seqlens(g).numpy())


@pytest.mark.parametrize("hidden,heads", [(1024, 16), (1152, 16), (32, 2)])  # head_dim 64 (2B/4B), 72 (8B), 16 (tiny)
def test_rotary_cos_sin_matches_module(hidden, heads):
    rotary = Qwen3VLVisionRotaryEmbedding(Qwen3VLVisionConfig(hidden_size=hidden, num_heads=heads))
    head_dim = hidden // heads
    np.testing.assert_array_equal(rotary_inv_freq(head_dim), rotary.inv_freq.numpy())
    g = torch.tensor([[1, 68, 120], [2, 8, 8], [1, 202, 322]])
    pos = get_vision_position_ids(g, 2)
    ref_cos, ref_sin = rotary(torch.zeros(1), pos)
    cos, sin = rotary_cos_sin(pos.numpy(), head_dim)
    assert cos.shape == (len(pos), head_dim) and cos.dtype == np.float32
    # torch's float32 cos/sin vs numpy's correctly rounded ones: at most 1 ulp apart
    assert np.abs(cos - ref_cos.numpy()).max() <= 1.2e-7
    assert np.abs(sin - ref_sin.numpy()).max() <= 1.2e-7


@pytest.fixture(scope="module")
def tiny_vision():
    torch.manual_seed(0)
    cfg = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                              deepstack_visual_indexes=[0])
    return Qwen3VLVisionModel(cfg).eval()


def capture_vision(model, pixel_values, grid, **kwargs):
    """Run the vision tower, recording the patch embedding and block 0's inputs."""
    seen = {}
    h1 = model.patch_embed.register_forward_hook(lambda m, a, out: seen.__setitem__("patch", out.detach().clone()))

    def pre(m, args, kw):
        seen["block_in"] = (args[0] if args else kw["hidden_states"]).detach().clone()
        seen["cos"], seen["sin"] = (t.detach().clone() for t in kw["position_embeddings"])
        seen["cu_seqlens"] = kw["cu_seqlens"].clone()

    h2 = model.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(pixel_values, grid_thw=grid, **kwargs)
    finally:
        h1.remove()
        h2.remove()
    return out, seen


@pytest.mark.parametrize("grid", [[[1, 6, 8]], [[2, 4, 6]], [[1, 4, 4], [1, 2, 6]]])
def test_inputs_drive_the_real_vision_tower(tiny_vision, grid):
    """Our arrays are what the tower computes internally, and passing them in (as an ONNX graph will) changes nothing."""
    g = torch.tensor(grid)
    n = int(g.prod(-1).sum())
    pixel_values = torch.randn(n, 1536, generator=torch.Generator().manual_seed(1))
    out, seen = capture_vision(tiny_vision, pixel_values, g)

    vin = build_vision_inputs(np.asarray(grid), VisionConfig(hidden_size=32, num_heads=2))
    table = tiny_vision.pos_embed.weight.detach().numpy()  # (2304, 32)
    pos_embeds = (table[vin.interp_indices] * vin.interp_weights[:, :, None]).sum(1)  # (N, 32)
    np.testing.assert_allclose(seen["block_in"].numpy() - seen["patch"].numpy(), pos_embeds, atol=1e-6)
    assert np.abs(seen["cos"].numpy() - vin.cos).max() <= 1.2e-7
    assert np.abs(seen["sin"].numpy() - vin.sin).max() <= 1.2e-7
    np.testing.assert_array_equal(seen["cu_seqlens"].numpy(), vin.cu_seqlens)

    out2, _ = capture_vision(
        tiny_vision, pixel_values, g,
        interp_indices=torch.from_numpy(vin.interp_indices), interp_weights=torch.from_numpy(vin.interp_weights),
        position_ids=torch.from_numpy(vin.position_ids), cu_seqlens=torch.from_numpy(vin.cu_seqlens),
    )
    np.testing.assert_array_equal(out.pooler_output.numpy(), out2.pooler_output.numpy())
    assert num_merged_tokens(np.asarray(grid)).sum() == out.pooler_output.shape[0]


def test_errors():
    with pytest.raises(UserError, match="multiples of merge_size"):
        interpolation_indices_and_weights([1, 3, 4])
    with pytest.raises(UserError, match="positive"):
        rotary_position_ids([1, 0, 4])
    with pytest.raises(UserError, match="multiple of 4"):
        rotary_cos_sin(np.zeros((4, 2), np.int64), 18)
