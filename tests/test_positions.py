"""qwen3vl_lab.positions vs transformers' Qwen3VLModel.get_rope_index and generate() (reference)."""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qwen3vl_lab.config import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID  # noqa: E402
from qwen3vl_lab.errors import UserError  # noqa: E402
from qwen3vl_lab.positions import build_positions, mm_token_type_ids, mrope_channel_axes, next_positions  # noqa: E402

PAD = 151643
IM_START, USER_NL = 151644, [872, 198]


def tiny_config(layers: int = 4):
    """The tiny random Qwen3-VL of (real vocab so the real special ids work)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, out_hidden_size=64,
            num_position_embeddings=2304, deepstack_visual_indexes=[0],
        ),
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    m = Qwen3VLForConditionalGeneration(tiny_config()).eval()
    return m


def image_tokens(grid):
    t, h, w = grid
    return [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * (t * h * w // 4) + [VISION_END_TOKEN_ID]


def video_tokens(grid, timestamps):
    """Qwen reference layout: per temporal patch `<ts seconds><|vision_start|><|video_pad|>*n<|vision_end|>`."""
    t, h, w = grid
    out = []
    for k in range(t):
        out += timestamps[k] + [VISION_START_TOKEN_ID] + [VIDEO_TOKEN_ID] * (h * w // 4) + [VISION_END_TOKEN_ID]
    return out


def prompt(*parts):
    ids = [IM_START] + USER_NL
    for p in parts:
        ids += p
    return ids + [3838, 374, 419, 30, 151645, 198, IM_START, 77091, 198]


def reference(model, ids, image_grid=None, video_grid=None, mask=None):
    ids_t = torch.tensor(ids)
    mm = torch.tensor(mm_token_type_ids(np.asarray(ids)))
    kw = dict(
        image_grid_thw=None if image_grid is None else torch.tensor(image_grid),
        video_grid_thw=None if video_grid is None else torch.tensor(video_grid),
        attention_mask=None if mask is None else torch.tensor(mask),
    )
    with torch.no_grad():
        pos, delta = model.model.get_rope_index(ids_t, mm_token_type_ids=mm, **kw)
    return pos.numpy(), delta.numpy()


def check(model, ids, image_grid=None, video_grid=None, mask=None):
    ref_pos, ref_delta = reference(model, ids, image_grid, video_grid, mask)
    ours = build_positions(np.asarray(ids), image_grid, video_grid, None if mask is None else np.asarray(mask))
    assert ours.position_ids.dtype == np.int64 and ours.rope_deltas.dtype == np.int64
    assert ours.position_ids.shape == ref_pos.shape and ours.rope_deltas.shape == ref_delta.shape
    np.testing.assert_array_equal(ours.position_ids, ref_pos)
    np.testing.assert_array_equal(ours.rope_deltas, ref_delta)
    return ours


def left_pad(rows):
    n = max(len(r) for r in rows)
    ids = [[PAD] * (n - len(r)) + r for r in rows]
    mask = [[0] * (n - len(r)) + [1] * len(r) for r in rows]
    return ids, mask


def test_text_only(model):
    ours = check(model, [prompt([9707, 11, 1879])])
    assert ours.rope_deltas.tolist() == [[0]]
    np.testing.assert_array_equal(ours.position_ids[0, 0], np.arange(15))


def test_one_image_worked_example(model):
    """: 300x400 -> grid (1,18,24), 108 tokens, s = 4, <|vision_end|> at 16, delta -96."""
    grid = [1, 18, 24]
    ids = prompt(image_tokens(grid))
    ours = check(model, [ids], [grid])
    assert ours.rope_deltas.tolist() == [[-96]]
    assert ours.position_ids[:, 0, 4].tolist() == [4, 4, 4] and ours.position_ids[:, 0, 111].tolist() == [4, 12, 15]
    assert ours.position_ids[:, 0, 112].tolist() == [16, 16, 16]


@pytest.mark.parametrize(
    "grids",
    [
        [[1, 16, 16], [1, 16, 20]],  #: delta -126
        [[1, 2, 2], [1, 20, 4], [1, 4, 90], [1, 16, 16]],  # smallest grid, tall, very wide
        [[1, 68, 120]],  # 1080x1920
        [[1, 202, 322]],  # the largest grid the default max_pixels allows (5000x8000)
    ],
)
def test_several_images(model, grids):
    parts = []
    for g in grids:
        parts += [image_tokens(g), [32, 13]]  # "A." between images
    check(model, [prompt(*parts)], grids)


def test_video_with_timestamps(model):
    """: grid (2,8,8); frames separated by `<x.x seconds>` text; delta -24."""
    ts = [[27, 15, 13, 17, 6486, 29], [27, 16, 13, 17, 6486, 29]]  # "<0.2 seconds>", "<1.2 seconds>"-like runs
    ids = prompt(video_tokens([2, 8, 8], ts))
    ours = check(model, [ids], video_grid=[[2, 8, 8]])
    assert ours.rope_deltas.tolist() == [[-24]]


def test_video_transformers_524_layout(model):
    """5.24's processor keeps an outer <|vision_start|>...<|vision_end|> around the frames; still text."""
    ts = [[27, 15, 29], [27, 16, 29]]
    ids = prompt([VISION_START_TOKEN_ID], video_tokens([2, 4, 6], ts), [VISION_END_TOKEN_ID])
    check(model, [ids], video_grid=[[2, 4, 6]])


def test_images_and_videos_mixed(model):
    ts = [[27, 15, 29], [27, 16, 29], [27, 17, 29]]
    ids = prompt(
        image_tokens([1, 4, 6]), [32], video_tokens([3, 6, 4], ts), [32], image_tokens([1, 8, 2]), video_tokens([1, 2, 2], ts)
    )
    check(model, [ids], [[1, 4, 6], [1, 8, 2]], [[3, 6, 4], [1, 2, 2]])


def test_left_padded_batch_with_images(model):
    rows = [
        prompt(image_tokens([1, 16, 16])),
        prompt([9707], image_tokens([1, 4, 8]), [32, 13], image_tokens([1, 6, 2])),
        prompt([9707, 11, 1879, 0]),
    ]
    ids, mask = left_pad(rows)
    ours = check(model, ids, [[1, 16, 16], [1, 4, 8], [1, 6, 2]], mask=mask)
    assert (ours.position_ids[:, np.asarray(mask) == 0] == 0).all()  # pads get 0, like transformers
    # a left-padded row gets exactly the positions of the same prompt alone
    alone = build_positions(np.asarray([rows[1]]), [[1, 4, 8], [1, 6, 2]])
    np.testing.assert_array_equal(ours.position_ids[:, 1, -len(rows[1]):], alone.position_ids[:, 0])


def test_full_mask_equals_no_mask(model):
    ids = [prompt(image_tokens([1, 8, 12]))]
    check(model, ids, [[1, 8, 12]], mask=[[1] * len(ids[0])])


def test_errors():
    ids = np.asarray([prompt(image_tokens([1, 4, 4]))])
    with pytest.raises(UserError, match="needs"):
        build_positions(ids, [[1, 8, 8]])
    with pytest.raises(UserError, match="more image"):
        build_positions(ids, None)
    with pytest.raises(UserError, match="blocks"):
        build_positions(ids, [[1, 4, 4], [1, 4, 4]])
    with pytest.raises(UserError, match="shape"):
        build_positions(ids[0], [[1, 4, 4]])
    with pytest.raises(UserError, match="no 1s"):
        build_positions(ids, [[1, 4, 4]], attention_mask=np.zeros_like(ids))


def test_next_positions_formulas():
    deltas = np.array([[-96], [-5]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = next_positions(mask, deltas, n_new=2)
    assert out.shape == (3, 2, 2)
    assert out[0].tolist() == [[2 - 96, 3 - 96], [4 - 5, 5 - 5]]
    assert (out[0] == out[1]).all() and (out[0] == out[2]).all()
    np.testing.assert_array_equal(next_positions(None, deltas, 1, cache_len=146)[0], [[50], [141]])
    with pytest.raises(UserError):
        next_positions(None, deltas)


def test_next_positions_match_model_decode_path(model):
    """transformers' own decode branch (compute_3d_position_ids with a cache) with and without a mask."""
    from transformers import DynamicCache

    rows = [prompt(image_tokens([1, 16, 16])), prompt([9707, 11], image_tokens([1, 4, 8]))]
    ids, mask = left_pad(rows)
    ours = build_positions(np.asarray(ids), [[1, 16, 16], [1, 4, 8]], attention_mask=np.asarray(mask))
    inner = model.model
    inner.rope_deltas = torch.tensor(ours.rope_deltas)
    cache = DynamicCache(config=model.config.text_config)
    kv = torch.zeros(2, 2, len(ids[0]), 16)
    for layer in range(model.config.text_config.num_hidden_layers):
        cache.update(kv, kv, layer)
    full_mask = np.concatenate([np.asarray(mask), np.ones((2, 1), np.int64)], axis=1)
    embeds = torch.zeros(2, 1, 64)
    ref_mask = inner.compute_3d_position_ids(None, embeds, attention_mask=torch.tensor(full_mask), cache=cache)
    # transformers' mask branch numbers the whole mask (a transformers 5.24 bug); its last column is the new token
    np.testing.assert_array_equal(next_positions(full_mask, ours.rope_deltas), ref_mask.numpy()[..., -1:])
    ref_nomask = inner.compute_3d_position_ids(None, embeds, cache=cache)
    np.testing.assert_array_equal(next_positions(None, ours.rope_deltas, cache_len=len(ids[0])), ref_nomask.numpy())


def test_next_positions_match_generate(model):
    """Record the position_ids generate() passes to forward on every step of a left-padded batch with images."""
    grids = [[1, 8, 8], [1, 4, 8]]
    rows = [prompt(image_tokens(grids[0])), prompt([9707, 11, 1879], image_tokens(grids[1]))]
    ids, mask = left_pad(rows)
    ids_np, mask_np = np.asarray(ids), np.asarray(mask)
    ours = build_positions(ids_np, grids, attention_mask=mask_np)

    recorded = []
    original = model.forward

    @functools.wraps(original)  # generate() inspects forward's signature
    def spy(*args, **kwargs):
        recorded.append(kwargs["position_ids"].clone())
        return original(*args, **kwargs)

    n_patches = sum(t * h * w for t, h, w in grids)
    pixel_values = torch.randn(n_patches, 1536, generator=torch.Generator().manual_seed(0))
    model.forward = spy
    try:
        with torch.no_grad():
            model.generate(
                input_ids=torch.tensor(ids_np), attention_mask=torch.tensor(mask_np),
                mm_token_type_ids=torch.tensor(mm_token_type_ids(ids_np)), pixel_values=pixel_values,
                image_grid_thw=torch.tensor(grids), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD,
            )
    finally:
        del model.forward
    assert len(recorded) == 4
    prefill = recorded[0].numpy()  # (4, B, S): row 0 text positions (mask only), rows 1-3 t, h, w
    np.testing.assert_array_equal(prefill[1:], ours.position_ids)
    for step, pos in enumerate(recorded[1:], start=1):
        full_mask = np.concatenate([mask_np, np.ones((2, step), np.int64)], axis=1)
        np.testing.assert_array_equal(pos.numpy()[1:], next_positions(full_mask, ours.rope_deltas, 1))
        # without a mask, cache_len + delta is right only for the unpadded row 0 (pads count in cache_len)
        no_mask = next_positions(None, ours.rope_deltas, 1, cache_len=len(ids[0]) + step - 1)
        np.testing.assert_array_equal(pos.numpy()[1:, 0], no_mask[:, 0])


def test_mrope_channel_axes_match_recomposition(model):
    """Feed axis ids 0/1/2 through transformers' recomposition_frequencies and read back the axis per channel."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    for head_dim, section in [(16, [4, 2, 2]), (128, [24, 20, 20]), (128, [16, 24, 24])]:
        cfg = tiny_config().text_config
        cfg.head_dim = head_dim
        cfg.rope_parameters = {**cfg.rope_parameters, "mrope_section": section}
        rotary = Qwen3VLTextRotaryEmbedding(cfg)
        freq = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, head_dim // 2).clone()
        ref = rotary.recomposition_frequencies(freq)[0, 0].long().numpy()  # (head_dim,)
        ours = mrope_channel_axes(section, head_dim)
        np.testing.assert_array_equal(np.array(list("THW"))[ref], np.concatenate([ours, ours]))
    assert "".join(mrope_channel_axes([4, 2, 2], 16)) == "THWTHWTT"
    assert "".join(mrope_channel_axes([24, 20, 20], 128)).endswith("THWTTTT")
