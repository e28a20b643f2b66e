"""Prompts in, tokens out: preparing a prompt, then ONE generation loop (`generate_step`, mlx-lm's shape).

    prompt = prepare_prompt(model, "Hello")                           # ids, embeddings, 3-D positions
    prompt = prepare_multimodal_prompt(model, "Describe it.", images=["photo.jpg"])   # + vision, DeepStack
    for s in generate_step(model, prompt, sampler, max_new_tokens=20):   # any Decoder, any sampler
        s.tokens, s.logits, s.step.cache, s.seconds                   # one record per token
    for token in generate_tokens(model, prompt, sampler, 20):         # just the ids (batch of one)
        ...

`prepare_multimodal_prompt` = preprocess_visuals -> tokenize -> (context check) -> merge_visuals
(encode_image, merge_vision, deepstack_embeds, build_positions per steps.py); each part is callable
on its own for notebooks.

Everything that generates consumes `generate_step`: `generate_tokens`, the batches below, the fast
path (`decoder=FastDecoder(model)`, or fast=True), the pipeline's stream and batch calls, the trace
behind the widgets (viz/trace.py) and the shapes evaluation. `tokenizer.stream_text` turns tokens into
text pieces without ever splitting a multi-byte character.

Batches (B prompts of different lengths at once):

    batch = pad_prompts(model, [prompt_a, prompt_b])                  # left padding, attention_mask, positions
    for s in batch_steps(model, batch, sampler, max_new_tokens=20):   # s.tokens (B,), s.finished (B,)
        ...
    token_lists = generate_batch(model, [prompt_a, prompt_b], sampler, 20)   # one list of ids per prompt

`prefill_chunk=N` prefills long prompts N tokens at a time (same logits and cache, less memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .decoder import Decoder, MissingPiece, Step
from .errors import UserError
from .fast import FastDecoder
from .image import ImageProcessorConfig, preprocess_one
from .model import Model
from .positions import Positions
from .sampling import SamplerFn
from .steps import build_positions, deepstack_embeds, embed, encode_image, merge_vision, tokenize
from .tokenizer import IMAGE_PAD, VIDEO_PAD
from .video import VideoProcessorConfig, preprocess_video_one
from .vision import VisionFeatures


@dataclass
class Prompt:
    """Everything prefill needs, computed before the decoder runs (inspectable in notebooks)."""

    input_ids: np.ndarray  # (B, S) int64
    inputs_embeds: np.ndarray | None  # (B, S, H), image features already merged; None: the decoder embeds ids
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
    """A text-only prompt from token ids (1, S). Embedded by the model's embedding graph; a decoder without
    one (onnxruntime-genai's builder without exclude_embeds) takes the ids themselves (inputs_embeds None)."""
    input_ids = np.asarray(input_ids, np.int64).reshape(1, -1)
    check_context(model, input_ids.shape[1])
    embeds = embed(model, input_ids) if model.embedding is not None else None
    return Prompt(input_ids, embeds, build_positions(input_ids))


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
    if not model.has_vision and model.kind != "qwen3vl-lab":
        lacks = ["a vision graph this toolkit can run", *model.teaching_decoder.io.missing]
        fix = f"qwen3vl-lab export --hf_dir {model.layout.hf_dir}" if model.layout.hf_dir else "qwen3vl-lab export --hf_dir CKPT"
        raise MissingPiece(f"this {model.kind} export cannot read images: it lacks {'; '.join(lacks)}; `{fix}` makes "
                           "an export that has them (doctor --model_dir shows what each piece changes)")
    if not model.has_vision:
        raise UserError(f"{model.folder} has no vision model, so it cannot read images or videos; export a Qwen3-VL "
                        "checkpoint with vision weights (`qwen3vl-lab export`) or leave out the images")


def preprocess_visuals(model: Model, images=None, videos=None, image_size=None, video_fps: float = 2.0) -> VisualInputs:
    """Images (paths, PIL images, numpy arrays) and videos (files, folders, lists of frames) -> pixel patches + grids.

    Uses the checkpoint's preprocessor_config.json / video_preprocessor_config.json when the export has them.
    image_size: None = transformers' smart_resize; an int N (or (h, w)) resizes everything to N x N.
    """
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


def open_decoder(model: Model, fast: bool = False) -> Decoder:
    """The teaching decoder (model.onnx, an inspectable cache) or the fast one (model-fast.onnx, IOBinding)."""
    return FastDecoder(model) if fast else model.teaching_decoder


def run_prefill(model: Model, prompt: Prompt, prefill_chunk: int | None = None, *, decoder: Decoder | None = None,
                cache=None) -> Step:
    """The prompt through the decoder (default: the teaching one, a new cache): whole, or `prefill_chunk` tokens
    at a time (same logits and cache)."""
    decoder = decoder or model.teaching_decoder
    cache = cache if cache is not None else decoder.new_cache(prompt.input_ids.shape[0], prompt.length)
    kwargs = dict(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, deepstack=prompt.deepstack)
    if prefill_chunk is None or prefill_chunk >= prompt.length:
        return decoder.prefill(cache, prompt.inputs_embeds, prompt.positions.position_ids, **kwargs)
    return decoder.prefill_chunked(cache, prompt.inputs_embeds, prompt.positions.position_ids, prefill_chunk, **kwargs)


@dataclass
class GenerationStep:
    """One token per row, as the generation loop yields it."""

    index: int  # 0: the token drawn from the prefill's logits, then one per decode step
    tokens: np.ndarray  # (B,) int64: each row's new token; the pad id for rows that had already finished
    finished: np.ndarray  # (B,) bool: the row is done after this token (end of sequence or its budget)
    step: Step  # the decoder call whose logits the tokens were drawn from (logits, cache, positions, attentions)
    seconds: float  # wall time of this token: decoder call, sampling and bookkeeping
    decoder_seconds: float  # the part spent in the decoder call

    @property
    def logits(self) -> np.ndarray:
        """(B, V) the scores the tokens were drawn from (the fast decoder's are a view: copy to keep them)."""
        return self.step.logits


def generate_step(model: Model, prompt: Prompt, sampler: SamplerFn, max_new_tokens: int = 100, *,
                  decoder: Decoder | None = None, eos_token_ids: Sequence[int] | None = None,
                  prefill_chunk: int | None = None, pad_token_id: int | None = None) -> Iterator[GenerationStep]:
    """THE generation loop: prefill once, then one decode step per token; one GenerationStep per token.

    Any `Decoder` (default: the teaching decoder) and any sampler `(logits (B, V), previous ids) -> (B,)`.
    A batch (B, S) may be left-padded (`pad_prompts`). Like transformers' generate, rows that finished
    keep taking a dummy token (the pad id, attention mask 1) so the batch stays rectangular; their later
    tokens are not theirs. The sampler sees each row's own history (prompt without pads + its tokens) —
    a (B, T) array when no row is padded, else one array per row — so repetition penalties match a lone
    run. A row stops after an end-of-sequence id (<|im_end|> / <|endoftext|>, which it still yields, as
    transformers' generate returns it), after max_new_tokens, or at the context limit.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    decoder = decoder or model.teaching_decoder
    eos = np.array(sorted(set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)), np.int64)
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    padded = prompt.attention_mask is not None and not np.asarray(prompt.attention_mask).all()
    mask = np.ones(prompt.input_ids.shape, bool) if prompt.attention_mask is None else prompt.attention_mask.astype(bool)
    lengths = mask.sum(axis=1)  # (B,) real prompt tokens per row
    check_context(model, int(lengths.max()))
    budget = np.minimum(max_new_tokens, model.context_length - lengths)  # (B,) the context limit is per row
    histories = [row[keep] for row, keep in zip(prompt.input_ids, mask)]
    finished = np.zeros(len(lengths), bool)  # (B,)
    t0 = time.perf_counter()
    step = run_prefill(model, prompt, prefill_chunk, decoder=decoder,
                       cache=decoder.new_cache(len(lengths), prompt.length + int(budget.max())))
    decoder_seconds = time.perf_counter() - t0
    for n in range(int(budget.max())):
        previous = histories if padded else np.stack(histories)  # (B, T) or one (T_b,) per row
        token = np.asarray(sampler(step.logits, previous), np.int64).reshape(-1)  # (B,)
        token = np.where(finished, pad, token)
        histories = [h if done else np.append(h, tok) for h, tok, done in zip(histories, token, finished)]
        finished = finished | np.isin(token, eos) | (n + 1 >= budget)
        yield GenerationStep(n, token, finished.copy(), step, time.perf_counter() - t0, decoder_seconds)
        if finished.all():
            return
        t0 = time.perf_counter()
        step = decoder.decode(step.cache, token, prompt.positions.rope_deltas)
        decoder_seconds = time.perf_counter() - t0


def generate_tokens(model: Model, prompt: Prompt, sampler: SamplerFn, max_new_tokens: int = 100,
                    eos_token_ids: Sequence[int] | None = None, prefill_chunk: int | None = None,
                    fast: bool = False) -> Iterator[int]:
    """`generate_step` for one prompt, yielding each new token id. fast=True: the same tokens from the
    fused decoder with preallocated KV buffers (fast.py)."""
    for s in generate_step(model, prompt, sampler, max_new_tokens, decoder=open_decoder(model, fast),
                           eos_token_ids=eos_token_ids, prefill_chunk=prefill_chunk):
        yield int(s.tokens[0])


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
    H = model.config.text.hidden_size
    input_ids = np.full((B, S), pad, np.int64)  # (B, S)
    inputs_embeds = None  # a decoder that embeds token ids itself takes the padded ids alone
    if prompts[0].inputs_embeds is not None:
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
        if inputs_embeds is not None:
            inputs_embeds[b, start:] = p.inputs_embeds[0]
        attention_mask[b, start:] = 1
        position_ids[:, b, start:] = p.positions.position_ids[:, 0]
        if p.deepstack is not None:
            deepstack[:, b, start:] = p.deepstack[:, 0]
    return Prompt(input_ids, inputs_embeds, Positions(position_ids, rope_deltas), deepstack, attention_mask)


def batch_steps(model: Model, batch: Prompt, sampler: SamplerFn, max_new_tokens: int = 100,
                eos_token_ids: Sequence[int] | None = None, prefill_chunk: int | None = None,
                pad_token_id: int | None = None) -> Iterator[GenerationStep]:
    """`generate_step` over a left-padded batch (`pad_prompts`): s.tokens (B,), s.finished (B,) per step."""
    yield from generate_step(model, batch, sampler, max_new_tokens, eos_token_ids=eos_token_ids,
                             prefill_chunk=prefill_chunk, pad_token_id=pad_token_id)


def generate_batch(model: Model, prompts: Sequence[Prompt], sampler: SamplerFn, max_new_tokens: int = 100,
                   eos_token_ids: Sequence[int] | None = None, prefill_chunk: int | None = None) -> list[list[int]]:
    """B prompts at once -> one list of new token ids per prompt (each as `generate_tokens` would give it)."""
    out: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for s in batch_steps(model, pad_prompts(model, prompts), sampler, max_new_tokens, eos_token_ids, prefill_chunk):
        for b in np.flatnonzero(~done):
            out[b].append(int(s.tokens[b]))
        done = s.finished
    return out
