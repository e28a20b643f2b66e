"""The ONNX vision graph (qwen3vl_lab/export/vision.py) + runtime (qwen3vl_lab/vision.py) vs
transformers' `Qwen3VLVisionModel` (reference), on tiny random towers and several grids."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from qwen3vl_lab.config import parse_hf_config  # noqa: E402
from qwen3vl_lab.errors import UserError  # noqa: E402
from qwen3vl_lab.export.vision import build_vision, vision_genai_section  # noqa: E402
from qwen3vl_lab.vision import VisionFeatures, encode_image, vision_feeds  # noqa: E402

TOL = 1e-4
MAX_DIFFS: dict[str, float] = {}  # printed at the end of the module (pytest -s)

# name -> (vision_config overrides, seed)
TOWERS = {
    # tiny tower: depth 3, hidden 32, 2 heads (hd 16), deepstack after every block
    "tiny": (dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  deepstack_visual_indexes=[0, 1, 2]), 0),
    # different depth, head count and DeepStack set: 4 heads of hd 16, deepstack after blocks 1 and 3
    "wide": (dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
                  deepstack_visual_indexes=[1, 3]), 1),
}

GRIDS = {
    "square_20x20": [[1, 20, 20]],
    "nonsquare_18x24": [[1, 18, 24]],
    "smallest_16x16": [[1, 16, 16]],
    "large_40x56": [[1, 40, 56]],
    "two_images": [[1, 16, 20], [1, 18, 24]],
    "video_t2": [[2, 16, 20]],
}


def hf_config(overrides: dict):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=1024, hidden_size=overrides["out_hidden_size"], intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=overrides["out_hidden_size"] // 2,
            initializer_range=0.1, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                             "mrope_section": _section(overrides["out_hidden_size"] // 4)},
        ),
        vision_config=dict(patch_size=16, num_position_embeddings=2304, initializer_range=0.1, **overrides),
        tie_word_embeddings=True,
    )


def _section(half: int) -> list[int]:
    h = half // 4
    return [half - 2 * h, h, h]


def randomize(visual, seed: int) -> None:
    """Move every LayerNorm/bias away from its (1, 0) init, so swapped or missing terms show."""
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            elif name.endswith("pos_embed.weight"):
                p.copy_(0.5 * noise)


@pytest.fixture(scope="module", params=list(TOWERS), ids=list(TOWERS))
def tower(request, tmp_path_factory):
    """(transformers model, our ModelConfig, ORT session, onnx path) for one tiny tower."""
    from transformers import Qwen3VLForConditionalGeneration

    overrides, seed = TOWERS[request.param]
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(hf_config(overrides)).eval()
    randomize(model.model.visual, seed)
    cfg = parse_hf_config(model.config.to_dict())
    assert cfg.vision.deepstack_visual_indexes == tuple(overrides["deepstack_visual_indexes"])
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp(f"vision-{request.param}")
    t0 = time.perf_counter()
    build_vision(cfg, lambda n: sd[n], folder / "qwen3vl-vision.onnx.data").save(folder / "qwen3vl-vision.onnx")
    MAX_DIFFS[f"{request.param}: export s"] = time.perf_counter() - t0
    onnx.checker.check_model(str(folder / "qwen3vl-vision.onnx"))
    session = ort.InferenceSession(str(folder / "qwen3vl-vision.onnx"), providers=["CPUExecutionProvider"])
    return request.param, model, cfg, session, folder / "qwen3vl-vision.onnx"


def random_pixels(grids, cfg, seed: int = 0) -> np.ndarray:
    n = int(np.asarray(grids).prod(axis=1).sum())
    return np.random.default_rng(seed).uniform(-1, 1, (n, cfg.vision.patch_dim)).astype(np.float32)


def reference(model, pixel_values: np.ndarray, grids):
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor(grids, dtype=torch.long))
    return out.pooler_output.numpy(), [d.numpy() for d in out.deepstack_features]


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_vision_matches_transformers(tower, grid_name):
    name, model, cfg, session, _ = tower
    grids = GRIDS[grid_name]
    pixels = random_pixels(grids, cfg, seed=len(grid_name))
    ref_feats, ref_ds = reference(model, pixels, grids)
    ours = encode_image(session, pixels, grids, cfg)
    assert isinstance(ours, VisionFeatures)
    n_tokens = sum(t * h * w for t, h, w in grids) // 4
    assert ours.image_features.shape == ref_feats.shape == (n_tokens, cfg.vision.out_hidden_size)
    assert ours.deepstack.shape == (cfg.num_deepstack, n_tokens, cfg.vision.out_hidden_size)
    assert len(ref_ds) == cfg.num_deepstack
    np.testing.assert_array_equal(ours.grid_thw, np.asarray(grids))
    diff = float(np.abs(ours.image_features - ref_feats).max())
    ds_diff = max(float(np.abs(ours.deepstack[j] - ref_ds[j]).max()) for j in range(len(ref_ds)))
    MAX_DIFFS[f"{name}/{grid_name}: image_features"] = diff
    MAX_DIFFS[f"{name}/{grid_name}: deepstack"] = ds_diff
    assert float(np.abs(ref_feats).max()) > 0.1  # the comparison is not between near-zero tensors
    assert diff < TOL, f"image_features max diff {diff}"
    assert ds_diff < TOL, f"deepstack max diff {ds_diff}"


def test_block_taps_match_transformers(tower):
    """Named intermediate tensors (vision.patch_embed, vision.blocks.{i}.output) equal the reference's."""
    name, model, cfg, _, path = tower
    grids = [[1, 18, 24]]
    pixels = random_pixels(grids, cfg, seed=7)
    taps = ["vision.patch_embed", "vision.embeddings"] + [f"vision.blocks.{i}.output" for i in range(cfg.vision.depth)]
    m = onnx.load(str(path))
    for t in taps:
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    # the weights stay in the external-data file: save the tapped model next to it
    tapped = path.with_name("tapped.onnx")
    onnx.save_model(m, str(tapped))
    sess = ort.InferenceSession(str(tapped), providers=["CPUExecutionProvider"])
    got = dict(zip(taps, sess.run(taps, vision_feeds(pixels, grids[0], cfg))))

    visual = model.model.visual
    seen: dict[str, np.ndarray] = {}
    hooks = [visual.patch_embed.register_forward_hook(lambda m_, i_, o: seen.__setitem__("vision.patch_embed", o.numpy()))]
    for i, blk in enumerate(visual.blocks):
        hooks.append(blk.register_forward_hook(lambda m_, i_, o, i=i: seen.__setitem__(f"vision.blocks.{i}.output", o.numpy())))
    try:
        reference(model, pixels, grids)
    finally:
        for h in hooks:
            h.remove()
    for t in taps:
        if t in seen:
            d = float(np.abs(got[t] - seen[t]).max())
            MAX_DIFFS[f"{name}/tap {t}"] = d
            assert d < TOL, f"{t}: max diff {d}"


def test_vision_feeds_shapes_and_errors(tower):
    _, _, cfg, session, _ = tower
    feeds = vision_feeds(random_pixels([[1, 16, 20]], cfg), (1, 16, 20), cfg)
    assert {i.name for i in session.get_inputs()} == set(feeds)
    assert feeds["pos_interp_indices"].dtype == np.int64 and feeds["pos_interp_indices"].shape == (320, 4)
    assert feeds["rotary_cos"].shape == (320, cfg.vision.head_dim)
    with pytest.raises(UserError, match="one temporal patch"):
        vision_feeds(random_pixels([[2, 16, 20]], cfg), (2, 16, 20), cfg)
    with pytest.raises(UserError, match="needs"):
        encode_image(session, random_pixels([[1, 16, 20]], cfg), [[1, 16, 16]], cfg)


def test_genai_section(tower):
    _, _, cfg, session, _ = tower
    sec = vision_genai_section(cfg)
    json.dumps(sec)
    assert sec["filename"] == "qwen3vl-vision.onnx" and sec["config_filename"] == "preprocessor_config.json"
    assert (sec["spatial_merge_size"], sec["patch_size"], sec["temporal_patch_size"]) == (2, 16, 2)
    assert set(sec["inputs"].values()) == {i.name for i in session.get_inputs()}
    assert set(sec["outputs"].values()) == {o.name for o in session.get_outputs()}
    assert sec["deepstack_output"] == "deepstack_features"


def test_report_max_diffs():
    """Runs last in this module: prints every recorded max diff (visible with pytest -s)."""
    for k, v in MAX_DIFFS.items():
        print(f"{k:60s} {v:.3g}")
