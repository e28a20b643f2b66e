"""The generation loop, built from the step functions only (mlx-examples style: it yields tokens).

    prompt = prepare_prompt(model, "Hello")                           # ids, embeddings, 3-D positions
    prompt = prepare_multimodal_prompt(model, "Describe it.", images=["photo.jpg"])   # + vision, DeepStack
    for token in generate_tokens(model, prompt, sampler, max_new_tokens=20):
        ...                                                           # one int per decode step

`prepare_multimodal_prompt` = preprocess_visuals -> tokenize -> (context check) -> merge_visuals
(encode_image, merge_vision, deepstack_embeds, build_positions per steps.py); each part is callable
on its own for notebooks.

`generate_tokens` stops after an end-of-sequence token (<|im_end|> / <|endoftext|>, which it still
yields, as transformers' generate returns it) or after max_new_tokens. `tokenizer.stream_text` turns
the tokens into text pieces without ever splitting a multi-byte character.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .model import Model
from .positions import Positions
from .steps import (build_positions, decode_step, deepstack_embeds, embed, encode_image, merge_vision, prefill,
                    tokenize)
from .vision import VisionFeatures

Sampler = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (logits (B, V), previous ids (B, T)) -> (B,)


@dataclass
class Prompt:
    """Everything prefill needs, computed before the decoder runs (inspectable in notebooks)."""

    input_ids: np.ndarray  # (B, S) int64
    inputs_embeds: np.ndarray  # (B, S, H), image features already merged
    positions: Positions  # position_ids (3, B, S), rope_deltas (B, 1)
    deepstack: np.ndarray | None = None  # (D, B, S, H), None for text-only prompts
    attention_mask: np.ndarray | None = None  # (B, S), None = no padding

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def check_context(model: Model, prompt_length: int) -> None:
    limit = model.context_length
    if prompt_length >= limit:
        raise UserError(f"the prompt has {prompt_length} tokens but the model's context holds {limit}; "
                        "shorten the prompt (or use a checkpoint with a longer max_position_embeddings)")


def prepare_ids(model: Model, input_ids: np.ndarray) -> Prompt:
    """A text-only prompt from token ids (1, S)."""
    input_ids = np.asarray(input_ids, np.int64).reshape(1, -1)
    check_context(model, input_ids.shape[1])
    return Prompt(input_ids, embed(model, input_ids), build_positions(input_ids))


def prepare_prompt(model: Model, prompt: str, *, raw: bool = False) -> Prompt:
    """A user turn through the chat template (or raw text) -> ids, embeddings and positions."""
    return prepare_ids(model, tokenize(model, prompt, raw=raw))


# -- images and videos ------------------------------------------------------------------------
VisionEncoder = Callable[[np.ndarray, np.ndarray], VisionFeatures]  # (pixel rows, grid (1, 3)) -> features


@dataclass
class VisualInputs:
    """The preprocessed images and videos of one prompt, in prompt order (before the vision tower)."""

    pixel_values: np.ndarray | None  # (N, 1536) float32, all images
    image_grid_thw: np.ndarray | None  # (n_images, 3) int64
    pixel_values_videos: np.ndarray | None = None  # (N_video, 1536) float32, all videos
    video_grid_thw: np.ndarray | None = None  # (n_videos, 3): (frame pairs, h, w)
    video_timestamps: list[list[float]] | None = None  # seconds of each frame pair, per video


def _as_list(items) -> list:
    """None, one item, or a list/tuple of items -> list (a numpy array is one item)."""
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _processor_folder(model: Model):
    folder = model.root / "pytorch"
    return folder if folder.is_dir() else None


def check_has_vision(model: Model) -> None:
    if not model.has_vision:
        raise UserError(f"{model.folder} has no vision model, so it cannot read images or videos; export a Qwen3-VL "
                        "checkpoint with vision weights (`qwen3vl-lab export`) or leave out the images")


def preprocess_visuals(model: Model, images=None, videos=None, image_size=None, video_fps: float = 2.0) -> VisualInputs:
    """Images (paths, PIL images, numpy arrays) and videos (folders / lists of frames) -> pixel patches + grids.

    Uses the checkpoint's preprocessor_config.json / video_preprocessor_config.json when the export has them.
    image_size: None = transformers' smart_resize; an int N (or (h, w)) resizes everything to N x N.
    """
    from .image import ImageProcessorConfig, preprocess_one  # noqa: PLC0415
    from .video import VideoProcessorConfig, preprocess_video_one  # noqa: PLC0415

    images, videos = _as_list(images), _as_list(videos)
    folder = _processor_folder(model)
    out = VisualInputs(None, None)
    if images:
        config = ImageProcessorConfig.from_dir(folder) if folder and (folder / "preprocessor_config.json").is_file() \
            else ImageProcessorConfig()
        done = [_named(preprocess_one, "image", i, im, config, image_size) for i, im in enumerate(images)]
        out.pixel_values = np.concatenate([d[0] for d in done])  # (N, 1536)
        out.image_grid_thw = np.stack([d[1] for d in done]).astype(np.int64)  # (n, 3)
    if videos:
        config = VideoProcessorConfig.from_dir(folder)
        done = [_named(preprocess_video_one, "video", i, v, config, image_size, video_fps) for i, v in enumerate(videos)]
        out.pixel_values_videos = np.concatenate([d[0] for d in done])
        out.video_grid_thw = np.stack([d[1] for d in done]).astype(np.int64)
        out.video_timestamps = [d[2] for d in done]
    return out


def _named(fn, kind: str, index: int, item, *args):
    """Run one item's preprocessing; errors name the item (its path, or its position in the list)."""
    try:
        return fn(item, *args)
    except UserError as e:
        label = str(item) if isinstance(item, (str, Path)) else f"{kind} {index + 1}"
        if label in str(e):
            raise
        raise UserError(f"{label}: {e}") from None


def encode_visuals(model: Model, pixel_values: np.ndarray, grid_thw: np.ndarray,
                   encoder: VisionEncoder | None = None) -> VisionFeatures:
    """Run the vision tower item by item (so `encoder` may reuse earlier results) and concatenate.

    encoder(pixel_rows, grid (1, 3)) -> VisionFeatures; default `steps.encode_image`. Per-item calls give
    exactly the features of one call over all items (the tower attends within each image only)."""
    encode = encoder or (lambda rows, grid: encode_image(model, rows, grid))
    grids = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    sizes = np.prod(grids, axis=1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = [encode(pixel_values[starts[i]:starts[i + 1]], grids[i:i + 1]) for i in range(len(grids))]
    return VisionFeatures(image_features=np.concatenate([p.image_features for p in parts]),  # (n_tokens, H)
                          deepstack=np.concatenate([p.deepstack for p in parts], axis=1),  # (D, n_tokens, H)
                          grid_thw=grids)


def check_visual_context(model: Model, prompt_length: int, visual_tokens: int) -> None:
    limit = model.context_length
    if prompt_length >= limit:
        raise UserError(f"the prompt has {prompt_length} tokens ({visual_tokens} for images/videos) but the model's "
                        f"context holds {limit}; pass a smaller --image_size (e.g. 384), fewer or smaller images, "
                        "or fewer video frames")


def check_raw_placeholders(prompt: str, n_images: int, n_videos: int) -> None:
    from .tokenizer import IMAGE_PAD, VIDEO_PAD  # noqa: PLC0415

    for pad, n, kind in ((IMAGE_PAD, n_images, "image"), (VIDEO_PAD, n_videos, "video")):
        if prompt.count(pad) != n:
            raise UserError(f"the raw prompt holds {prompt.count(pad)} {pad} placeholders for {n} {kind}s; put one "
                            f"<|vision_start|>{pad}<|vision_end|> per {kind} in it, or drop --raw")


def prepare_multimodal_prompt(model: Model, prompt: str, images=None, videos=None, image_size=None,
                              raw: bool = False, *, video_fps: float = 2.0,
                              encoder: VisionEncoder | None = None) -> Prompt:
    """Text + images/videos -> a Prompt: preprocess -> tokenize -> encode -> merge -> DeepStack -> positions.

    images: one or a list of paths / PIL images / numpy arrays, placed before the text in the user turn,
    in order; videos: folders of frames or lists of frames (after the images). With raw=True the prompt
    text must already hold one `<|vision_start|><|image_pad|><|vision_end|>` per image. Without images
    and videos this is `prepare_prompt`. The context limit is checked before the vision tower runs.
    """
    images, videos = _as_list(images), _as_list(videos)
    if not images and not videos:
        return prepare_prompt(model, prompt, raw=raw)
    check_has_vision(model)
    if raw:
        check_raw_placeholders(prompt, len(images), len(videos))
    visuals = preprocess_visuals(model, images, videos, image_size, video_fps)
    ids = tokenize(model, prompt, raw=raw, image_grid_thw=visuals.image_grid_thw,
                   video_grid_thw=visuals.video_grid_thw, video_timestamps=visuals.video_timestamps)  # (1, S)
    n_visual = int(np.isin(ids, [model.config.image_token_id, model.config.video_token_id]).sum())
    check_visual_context(model, ids.shape[1], n_visual)
    return merge_visuals(model, ids, visuals, encoder)


def merge_visuals(model: Model, input_ids: np.ndarray, visuals: VisualInputs,
                  encoder: VisionEncoder | None = None) -> Prompt:
    """Token ids (1, S) with expanded placeholders + preprocessed visuals -> Prompt (features merged)."""
    cfg = model.config
    embeds = embed(model, input_ids)  # (1, S, H)
    deepstack = None
    for pixels, grids, token_id in ((visuals.pixel_values, visuals.image_grid_thw, cfg.image_token_id),
                                    (visuals.pixel_values_videos, visuals.video_grid_thw, cfg.video_token_id)):
        if grids is None:
            continue
        feats = encode_visuals(model, pixels, grids, encoder)
        embeds = merge_vision(embeds, input_ids, feats, token_id)
        if feats.deepstack.shape[0]:
            deepstack = deepstack_embeds(input_ids, feats, token_id, into=deepstack)  # (D, 1, S, H)
    positions = build_positions(input_ids, visuals.image_grid_thw, visuals.video_grid_thw,
                                image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                                spatial_merge_size=cfg.vision.spatial_merge_size)
    return Prompt(input_ids, embeds, positions, deepstack)


def generate_tokens(model: Model, prompt: Prompt, sampler: Sampler, max_new_tokens: int = 100,
                    eos_token_ids: Sequence[int] | None = None) -> Iterator[int]:
    """Prefill once, then one decode step per token; yields each new token id (batch of one)."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    budget = min(max_new_tokens, model.context_length - prompt.length)
    step = prefill(model, prompt.inputs_embeds, prompt.positions, attention_mask=prompt.attention_mask,
                   deepstack=prompt.deepstack)
    history = prompt.input_ids
    for n in range(budget):
        token = np.asarray(sampler(step.logits, history), np.int64).reshape(-1)  # (B,)
        yield int(token[0])
        if int(token[0]) in eos or n + 1 == budget:
            return
        history = np.concatenate([history, token[:, None]], axis=1)
        step = decode_step(model, token[:, None], step.cache, prompt.positions.rope_deltas)
