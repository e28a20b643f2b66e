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

Batches (B prompts of different lengths at once):

    batch = pad_prompts(model, [prompt_a, prompt_b])                  # left padding, attention_mask, positions
    for s in batch_steps(model, batch, sampler, max_new_tokens=20):   # s.tokens (B,), s.finished (B,)
        ...
    token_lists = generate_batch(model, [prompt_a, prompt_b], sampler, 20)   # one list of ids per prompt

`prefill_chunk=N` (generate_tokens, batch_steps, generate_batch) prefills long prompts N tokens at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .model import Model
from .positions import Positions
from .steps import (Step, build_positions, decode_step, deepstack_embeds, embed, encode_image, merge_vision,
                    prefill, prefill_chunked, tokenize)
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


class ContextOverflow(UserError):
    """The prompt does not fit the checkpoint's context (max_position_embeddings)."""

    def __init__(self, message: str, prompt_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_tokens, self.limit = prompt_tokens, limit


def check_context(model: Model, prompt_length: int) -> None:
    limit = model.context_length
    if prompt_length >= limit:
        raise ContextOverflow(f"the prompt has {prompt_length} tokens but the model's context holds {limit}; "
                        "shorten the prompt (or use a checkpoint with a longer max_position_embeddings)",
                              prompt_length, limit)


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
    """Images (paths, PIL images, numpy arrays) and videos (files, folders, lists of frames) -> pixel patches + grids.

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
        raise ContextOverflow(f"the prompt has {prompt_length} tokens ({visual_tokens} for images/videos) but the "
                              f"model's context holds {limit}; pass a smaller --image_size (e.g. 384), fewer or "
                              "smaller images, or fewer video frames", prompt_length, limit)


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


def run_prefill(model: Model, prompt: Prompt, prefill_chunk: int | None = None) -> Step:
    """The prompt through the decoder: whole, or `prefill_chunk` tokens at a time (same logits and cache)."""
    if prefill_chunk is None or prefill_chunk >= prompt.length:
        return prefill(model, prompt.inputs_embeds, prompt.positions, attention_mask=prompt.attention_mask,
                       deepstack=prompt.deepstack)
    return prefill_chunked(model, prompt.inputs_embeds, prompt.positions, prefill_chunk,
                           attention_mask=prompt.attention_mask, deepstack=prompt.deepstack)


def generate_tokens(model: Model, prompt: Prompt, sampler: Sampler, max_new_tokens: int = 100,
                    eos_token_ids: Sequence[int] | None = None, prefill_chunk: int | None = None,
                    fast: bool = False) -> Iterator[int]:
    """Prefill once, then one decode step per token; yields each new token id (batch of one).

    fast=True runs the same loop on the fused decoder with preallocated KV buffers (`fast.py`): same tokens."""
    if fast:
        from .fast import fast_generate_tokens  # noqa: PLC0415

        yield from fast_generate_tokens(model, prompt, sampler, max_new_tokens, eos_token_ids, prefill_chunk=prefill_chunk)
        return
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    budget = min(max_new_tokens, model.context_length - prompt.length)
    step = run_prefill(model, prompt, prefill_chunk)
    history = prompt.input_ids
    for n in range(budget):
        token = np.asarray(sampler(step.logits, history), np.int64).reshape(-1)  # (B,)
        yield int(token[0])
        if int(token[0]) in eos or n + 1 == budget:
            return
        history = np.concatenate([history, token[:, None]], axis=1)
        step = decode_step(model, token[:, None], step.cache, prompt.positions.rope_deltas)


# -- batches ------------------------------------------------------------------------------------
def pad_prompts(model: Model, prompts: Sequence[Prompt], pad_token_id: int | None = None) -> Prompt:
    """Single prompts (1, S_i) -> one left-padded batch (B, S_max), as transformers pads (padding_side="left").

    The pads get the pad id (<|endoftext|>) and its embedding (what transformers' embed_tokens gives a
    padded input_ids), attention_mask 0, position 0 on all three axes and zero DeepStack. Masked keys get
    exactly zero attention weight, so the pads never change a real token. Each row keeps the positions and
    rope_delta it had alone: that is `build_positions(ids, grids, attention_mask)` (get_rope_index with the
    mask numbers only the real tokens), without needing the grids again.
    """
    if not prompts:
        raise UserError("no prompts to batch; pass at least one Prompt")
    for i, p in enumerate(prompts):
        if p.input_ids.shape[0] != 1 or p.attention_mask is not None:
            raise UserError(f"prompt {i} is already a batch {p.input_ids.shape}; pad_prompts takes single prompts")
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    B, S = len(prompts), max(p.length for p in prompts)
    H = prompts[0].inputs_embeds.shape[2]
    input_ids = np.full((B, S), pad, np.int64)  # (B, S)
    inputs_embeds = np.broadcast_to(embed(model, np.array([[pad]]))[0, 0], (B, S, H)).copy()  # (B, S, H)
    attention_mask = np.zeros((B, S), np.int64)  # (B, S)
    position_ids = np.zeros((3, B, S), np.int64)  # (3, B, S)
    rope_deltas = np.concatenate([p.positions.rope_deltas.reshape(1, 1) for p in prompts])  # (B, 1)
    with_deepstack = [p for p in prompts if p.deepstack is not None]
    deepstack = None
    if with_deepstack:
        D = with_deepstack[0].deepstack.shape[0]
        deepstack = np.zeros((D, B, S, H), np.float32)  # (D, B, S, H)
    for b, p in enumerate(prompts):
        start = S - p.length  # left padding: the real tokens end at the last column
        input_ids[b, start:] = p.input_ids[0]
        inputs_embeds[b, start:] = p.inputs_embeds[0]
        attention_mask[b, start:] = 1
        position_ids[:, b, start:] = p.positions.position_ids[:, 0]
        if p.deepstack is not None:
            deepstack[:, b, start:] = p.deepstack[:, 0]
    return Prompt(input_ids, inputs_embeds, Positions(position_ids, rope_deltas), deepstack, attention_mask)


@dataclass
class BatchStep:
    """One generation step of a batch."""

    tokens: np.ndarray  # (B,) int64: each row's new token; the pad id for rows that had already finished
    finished: np.ndarray  # (B,) bool: the row is done after this step (end of sequence or its budget)


def batch_steps(model: Model, batch: Prompt, sampler: Sampler, max_new_tokens: int = 100,
                eos_token_ids: Sequence[int] | None = None, prefill_chunk: int | None = None,
                pad_token_id: int | None = None) -> Iterator[BatchStep]:
    """`generate_tokens` for a left-padded batch (`pad_prompts`): one BatchStep per decode step.

    Like transformers' generate, rows that finished keep taking a dummy token (the pad id, attention
    mask 1) so the batch stays rectangular; their later tokens are not theirs. The sampler sees each
    row's own history (prompt without pads + its tokens), so repetition penalties match a lone run.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = np.array(sorted(set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)), np.int64)
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    mask = np.ones(batch.input_ids.shape, bool) if batch.attention_mask is None else batch.attention_mask.astype(bool)
    lengths = mask.sum(axis=1)  # (B,) real prompt tokens per row
    budget = np.minimum(max_new_tokens, model.context_length - lengths)  # (B,) the context limit is per row
    histories = [list(row[keep]) for row, keep in zip(batch.input_ids, mask)]
    finished = np.zeros(len(lengths), bool)  # (B,)
    step = run_prefill(model, batch, prefill_chunk)
    for n in range(1, int(budget.max()) + 1):
        token = np.asarray(sampler(step.logits, [np.asarray(h, np.int64) for h in histories]), np.int64).reshape(-1)
        token = np.where(finished, pad, token)  # (B,)
        for b in np.flatnonzero(~finished):
            histories[b].append(int(token[b]))
        finished = finished | np.isin(token, eos) | (n >= budget)
        yield BatchStep(token, finished.copy())
        if finished.all():
            return
        step = decode_step(model, token[:, None], step.cache, batch.positions.rope_deltas)


def generate_batch(model: Model, prompts: Sequence[Prompt], sampler: Sampler, max_new_tokens: int = 100,
                   eos_token_ids: Sequence[int] | None = None, prefill_chunk: int | None = None) -> list[list[int]]:
    """B prompts at once -> one list of new token ids per prompt (each as `generate_tokens` would give it)."""
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for s in batch_steps(model, pad_prompts(model, prompts), sampler, max_new_tokens, eos_token_ids, prefill_chunk):
        for b in np.flatnonzero(~done):
            out[b].append(int(s.tokens[b]))
        done = s.finished
    return out
