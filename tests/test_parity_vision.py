"""Images and videos through the whole ONNX pipeline compute what transformers' Qwen3-VL computes.

Our preprocessing (pixel-exact vs transformers, tests/test_image.py) feeds both sides: transformers
gets pixel_values / image_grid_thw (or pixel_values_videos / video_grid_thw) + mm_token_type_ids and
runs its own vision tower, merge, DeepStack and get_rope_index; we run the step functions
(encode_image -> merge_vision -> deepstack_embeds -> build_positions -> prefill -> decode_step).
Checked on the "tiny" (vision depth 3, 2 heads, DeepStack [0, 1, 2]) and "tiny-deep" (depth 4,
4 heads, DeepStack [1, 3]) checkpoints: prefill logits at every position and every decode step's
logits within 1e-4, greedy tokens identical to `generate`, 3-D positions identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from helpers import grace_hopper, print_max_diffs

from qwen3vl_lab.export.exporter import export  # noqa: E402
from qwen3vl_lab.generate import generate_tokens, prepare_multimodal_prompt, prepare_prompt, preprocess_visuals  # noqa: E402
from qwen3vl_lab.model import load_model  # noqa: E402
from qwen3vl_lab.pipeline import greedy  # noqa: E402
from qwen3vl_lab.positions import mm_token_type_ids  # noqa: E402
from qwen3vl_lab.steps import (  # noqa: E402
    build_positions,
    decode_step,
    deepstack_embeds,
    embed,
    encode_image,
    merge_vision,
    prefill,
    tokenize,
)
from qwen3vl_lab.video import patchify_video, video_smart_resize  # noqa: E402

TOL = 1e-4
N_NEW = 10
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_max_diffs():
    """Print the measured maxima at the end of the module (visible with pytest -s)."""
    yield
    print_max_diffs(MAX_DIFFS, width=28)

def noise_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    """Five 150x200 frames panning across the photo (odd count: the last frame is repeated)."""
    folder = tmp_path_factory.mktemp("frames")
    photo = Image.open(grace_hopper()).convert("RGB")
    for i in range(5):
        photo.crop((20 * i, 10 * i, 20 * i + 300, 10 * i + 225)).resize((200, 150)).save(folder / f"f{i:03d}.png")
    return folder


@pytest.fixture(scope="module", params=["tiny", "tiny-deep"])
def pair(request, tiny_dir, tiny_deep_dir, tmp_path_factory, hf_model_factory):
    """(our ONNX model, transformers' model) for one tiny preset."""
    ckpt = tiny_dir if request.param == "tiny" else tiny_deep_dir
    out = tmp_path_factory.mktemp("onnx") / request.param
    export(ckpt, out, progress=False, log=lambda _: None)
    return request.param, load_model(out), hf_model_factory(ckpt)


def cases(frames_dir):
    photo = grace_hopper()
    return {
        "image+text": dict(images=[photo]),  # 304 image tokens
        "two-images": dict(images=[photo, noise_image(200, 330, 1)]),
        "fixed-size-384": dict(images=[Image.open(photo)], image_size=384),
        "video-frames": dict(videos=[frames_dir]),
        "image+video": dict(images=[noise_image(96, 128, 2)], videos=[frames_dir]),
    }


CASES = ["image+text", "two-images", "fixed-size-384", "video-frames", "image+video"]
PROMPT = "Describe what you see."


# -- our side: the step functions, one visible result at a time --------------------------------
def ours_step_by_step(model, visuals, forced: np.ndarray):
    """preprocess (given) -> tokenize -> encode -> merge -> DeepStack -> positions -> prefill -> decode steps."""
    ids = tokenize(model, PROMPT, image_grid_thw=visuals.image_grid_thw, video_grid_thw=visuals.video_grid_thw,
                   video_timestamps=visuals.video_timestamps)  # (1, S)
    embeds = embed(model, ids)  # (1, S, H)
    deepstack = None
    for pixels, grid, token in ((visuals.pixel_values, visuals.image_grid_thw, model.config.image_token_id),
                                (visuals.pixel_values_videos, visuals.video_grid_thw, model.config.video_token_id)):
        if grid is None:
            continue
        feats = encode_image(model, pixels, grid)  # (n, H), (D, n, H)
        embeds = merge_vision(embeds, ids, feats.image_features, token)
        deepstack = deepstack_embeds(ids, feats.deepstack, token, into=deepstack)  # (D, 1, S, H)
    positions = build_positions(ids, visuals.image_grid_thw, visuals.video_grid_thw)
    step = prefill(model, embeds, positions, deepstack=deepstack, logits_to_keep=0)
    prefill_logits = step.logits[0]  # (S, V)
    steps = [prefill_logits[-1]]
    for tok in forced[:-1]:
        step = decode_step(model, np.array([[tok]]), step.cache, positions.rope_deltas)
        steps.append(step.logits[0])
    no_deepstack = prefill(model, embeds, positions, deepstack=None, logits_to_keep=1).logits[0]
    return ids, positions, prefill_logits, np.stack(steps), no_deepstack


# -- transformers' side -------------------------------------------------------------------------
def hf_inputs(ids: np.ndarray, visuals) -> dict:
    kw = {"mm_token_type_ids": torch.tensor(mm_token_type_ids(ids))}
    if visuals.image_grid_thw is not None:
        kw.update(pixel_values=torch.tensor(visuals.pixel_values), image_grid_thw=torch.tensor(visuals.image_grid_thw))
    if visuals.video_grid_thw is not None:
        kw.update(pixel_values_videos=torch.tensor(visuals.pixel_values_videos),
                  video_grid_thw=torch.tensor(visuals.video_grid_thw))
    return kw


def hf_reference(hf, ids: np.ndarray, visuals):
    kw = hf_inputs(ids, visuals)
    with torch.no_grad():
        hf.model.rope_deltas = None
        prefill_logits = hf(input_ids=torch.tensor(ids), **kw).logits[0].numpy()  # (S, V)
        hf.model.rope_deltas = None
        out = hf.generate(torch.tensor(ids), max_new_tokens=N_NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=151643, **kw)
        hf.model.rope_deltas = None
        positions, deltas = hf.model.get_rope_index(torch.tensor(ids), image_grid_thw=kw.get("image_grid_thw"),
                                                    video_grid_thw=kw.get("video_grid_thw"),
                                                    mm_token_type_ids=kw["mm_token_type_ids"])
    tokens = out.sequences[0, ids.shape[1]:].numpy()
    return prefill_logits, tokens, np.stack([l[0].numpy() for l in out.logits]), positions.numpy(), deltas.numpy()


@pytest.mark.parametrize("case", CASES)
def test_vision_prompt_matches_transformers(pair, case, frames_dir):
    preset, model, hf = pair
    spec = cases(frames_dir)[case]
    visuals = preprocess_visuals(model, spec.get("images"), spec.get("videos"), spec.get("image_size"))
    ids = tokenize(model, PROMPT, image_grid_thw=visuals.image_grid_thw, video_grid_thw=visuals.video_grid_thw,
                   video_timestamps=visuals.video_timestamps)
    ref_prefill, ref_tokens, ref_steps, ref_pos, ref_delta = hf_reference(hf, ids, visuals)

    ids, positions, prefill_logits, steps, no_deepstack = ours_step_by_step(model, visuals, ref_tokens)
    np.testing.assert_array_equal(positions.position_ids, ref_pos)
    np.testing.assert_array_equal(positions.rope_deltas.reshape(-1), ref_delta.reshape(-1))
    assert positions.rope_deltas[0, 0] < 0  # the visual blocks span fewer positions than tokens
    d_prefill = float(np.abs(prefill_logits - ref_prefill).max())
    d_steps = float(np.abs(steps - ref_steps).max())
    MAX_DIFFS[f"{preset}/{case}"] = max(d_prefill, d_steps)
    assert d_prefill <= TOL and d_steps <= TOL
    assert len(steps) == N_NEW
    # DeepStack matters: leaving it out moves the logits far beyond the tolerance
    assert np.abs(no_deepstack - ref_prefill[-1]).max() > 100 * TOL

    # the one-call path (what the pipeline and CLI use) gives transformers' greedy tokens
    prompt = prepare_multimodal_prompt(model, PROMPT, spec.get("images"), spec.get("videos"), spec.get("image_size"))
    np.testing.assert_array_equal(prompt.input_ids, ids)
    tokens = list(generate_tokens(model, prompt, greedy, N_NEW, eos_token_ids=[]))
    assert tokens == ref_tokens.tolist()


def test_dense_deepstack_is_zero_outside_visual_tokens(pair, frames_dir):
    _, model, _ = pair
    prompt = prepare_multimodal_prompt(model, PROMPT, images=[grace_hopper()], videos=[frames_dir])
    ids = prompt.input_ids
    visual = np.isin(ids, [model.config.image_token_id, model.config.video_token_id])  # (1, S)
    D = model.config.num_deepstack
    assert prompt.deepstack.shape == (D, 1, ids.shape[1], model.config.text.hidden_size)
    assert not prompt.deepstack[:, ~visual].any()
    assert (np.abs(prompt.deepstack[:, visual]).sum(-1) > 0).all()


def test_text_only_prompts_are_unaffected(pair):
    _, model, _ = pair
    a = prepare_multimodal_prompt(model, PROMPT, images=[], videos=None)
    b = prepare_prompt(model, PROMPT)
    assert a.deepstack is None and b.deepstack is None
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.inputs_embeds, b.inputs_embeds)
    assert not np.isin(a.input_ids, [model.config.image_token_id, model.config.video_token_id]).any()


# -- video preprocessing pieces vs transformers' Qwen3VLVideoProcessor ------------------------------
@pytest.mark.parametrize("t,h,w", [(4, 150, 200), (5, 720, 1280), (2, 20, 900), (64, 1080, 1920), (3, 31, 40)])
def test_video_smart_resize_matches_transformers(t, h, w):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    ref = smart_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=4096, max_pixels=25165824)
    assert video_smart_resize(t, h, w, 2, 32, 4096, 25165824) == tuple(ref)


def test_patchify_video_matches_transformers():
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    frames = np.random.default_rng(0).standard_normal((5, 3, 64, 96)).astype(np.float32)  # odd: padded
    ref, gt, gh, gw = Qwen3VLVideoProcessor.patchify(None, torch.tensor(frames)[None], patch_size=16, merge_size=2,
                                                     temporal_patch_size=2)
    ours, grid = patchify_video(frames, 16, 2, 2)
    assert grid.tolist() == [gt, gh, gw] == [3, 4, 6]
    np.testing.assert_array_equal(ours, ref[0].numpy())
