"""Record one generation once, then look at any step of it: the data behind every plot and widget.

    trace = record_generation(model, "Describe a cat.", max_new_tokens=8)
    trace.tokens                   # (N,) generated ids; tokens[k] was chosen from logits[k]
    trace.logits[k]                # (V,) step 0 = prefill (last position), step k = decode step k
    trace.attentions[k][layer]     # (heads, S_k, T_k): S_0 = prompt length, S_k = 1 afterwards
    trace.cache_history[k]         # CacheRecord: cached length and bytes per layer after step k
    trace.position_ids             # (3, S + N - 1) t/h/w of every token the decoder saw

The recording runs the step functions (`prefill`, `decode_step`) and nothing else, so a slider over
the steps only indexes these arrays. Attention values exist when the folder was exported with
`--with_attentions` (the notebooks' tiny checkpoint is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..cache import CacheRecord
from ..config import ModelConfig
from ..errors import UserError
from ..generate import Prompt, generate_step, prepare_multimodal_prompt, prepare_prompt, preprocess_visuals
from ..image import ImageProcessorConfig, unpatchify
from ..model import Model
from ..sampling import SamplerFn, greedy
from ..steps import build_positions, tokenize


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Entropy in nats of softmax(logits) over the last axis: 0 = certain, log(V) = uniform."""
    p = softmax(logits)
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(axis=-1)


def top_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of the last axis, largest first (ties: lower id first)."""
    return np.argsort(-np.asarray(logits), axis=-1, kind="stable")[..., :k]


def token_label(tokenizer, token_id: int, config: ModelConfig | None = None) -> str:
    """A short readable label for one token: image pads become <img>, newlines show as \\n."""
    if config is not None and token_id in (config.image_token_id, config.video_token_id):
        return "<img>" if token_id == config.image_token_id else "<vid>"
    text = tokenizer.decode([int(token_id)])
    return text.replace("\n", "\\n").replace("\t", "\\t") or f"#{token_id}"


def token_labels(tokenizer, ids: Sequence[int], config: ModelConfig | None = None) -> list[str]:
    return [token_label(tokenizer, int(t), config) for t in ids]


def image_token_cells(input_ids: np.ndarray, image_grid_thw, merge_size: int, image_token_id: int) -> list[np.ndarray]:
    """Per image, the sequence index of each of its tokens laid out on its merged grid -> (t, h/m, w/m).

    Image tokens come in row-major order over the merged grid (the merger's output order), image
    after image, so cell (r, c) of image k is the (r * w/m + c)-th <|image_pad|> of that image.
    """
    ids = np.asarray(input_ids).reshape(-1)
    where = np.flatnonzero(ids == image_token_id)  # (n_image_tokens,)
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    cells, start = [], 0
    for t, h, w in grids.tolist():
        n = t * (h // merge_size) * (w // merge_size)
        if start + n > len(where):
            raise UserError(f"image_grid_thw needs {start + n} image tokens but the prompt has {len(where)}; "
                            "build the prompt and the grid from the same images")
        cells.append(where[start:start + n].reshape(t, h // merge_size, w // merge_size))
        start += n
    return cells


def processor_config(model: Model):
    """The export's image preprocessing numbers (pytorch/preprocessor_config.json), else Qwen3-VL's defaults."""
    folder = model.root / "pytorch"
    if (folder / "preprocessor_config.json").is_file():
        return ImageProcessorConfig.from_dir(folder)
    return ImageProcessorConfig()


def seen_image(pixel_values: np.ndarray, grid_thw, config) -> np.ndarray:
    """The RGB uint8 (H, W, 3) picture the vision tower received: pixel patches un-patchified and un-normalized."""
    chw = unpatchify(pixel_values, grid_thw, config.patch_size, config.merge_size, config.temporal_patch_size)[0]
    mean = np.asarray(config.image_mean, np.float32)[:, None, None]
    std = np.asarray(config.image_std, np.float32)[:, None, None]
    rgb = (chw * std + mean) / config.rescale_factor  # (3, H, W) in 0..255
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def seen_images(pixel_values: np.ndarray, image_grid_thw, config) -> list[np.ndarray]:
    """One `seen_image` per row of image_grid_thw (pixel_values holds all images' patches in order)."""
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    starts = np.concatenate([[0], np.cumsum(np.prod(grids, axis=1))])
    return [seen_image(pixel_values[starts[i]:starts[i + 1]], grids[i], config) for i in range(len(grids))]


@dataclass
class PromptLayout:
    """Which token sits where: ids, their 3-D positions and labels, and the images' grids (no model outputs)."""

    input_ids: np.ndarray  # (S,)
    position_ids: np.ndarray  # (3, S)
    labels: list[str]  # (S,)
    config: ModelConfig
    image_grid_thw: np.ndarray | None = None  # (n_images, 3)
    images: list[np.ndarray] | None = None  # RGB (H, W, 3) per image, as the vision tower saw it

    def token_kind(self) -> np.ndarray:
        """(S,) 0 text, 1 image, 2 video: the same split the positions use."""
        ids = np.asarray(self.input_ids)
        kind = np.zeros(ids.shape, np.int64)
        kind[ids == self.config.image_token_id] = 1
        kind[ids == self.config.video_token_id] = 2
        return kind

    def image_cells(self) -> list[np.ndarray]:
        """Per image, the sequence index of every image token on its merged grid (t, h/m, w/m)."""
        if self.image_grid_thw is None:
            return []
        return image_token_cells(self.input_ids, self.image_grid_thw, self.config.vision.spatial_merge_size,
                                 self.config.image_token_id)


def prompt_layout(model: Model, prompt: str, *, images=None, image_size=None, raw: bool = False) -> PromptLayout:
    """Tokenize a prompt (with its images' placeholders) and number its tokens; the vision tower does not run."""
    grid, shown = None, None
    if images is not None:
        visuals = preprocess_visuals(model, images, None, image_size)
        grid = visuals.image_grid_thw  # (n, 3)
        shown = seen_images(visuals.pixel_values, grid, processor_config(model))
    ids = tokenize(model, prompt, raw=raw, image_grid_thw=grid)  # (1, S)
    positions = build_positions(ids, grid, image_token_id=model.config.image_token_id,
                                video_token_id=model.config.video_token_id,
                                spatial_merge_size=model.config.vision.spatial_merge_size)
    return PromptLayout(ids[0], positions.position_ids[:, 0], token_labels(model.tokenizer, ids[0], model.config),
                        model.config, grid, shown)


@dataclass
class GenerationTrace:
    """Everything one generation computed, step by step, as numpy arrays (batch of one)."""

    input_ids: np.ndarray  # (S,) the prompt
    tokens: np.ndarray  # (N,) generated ids
    logits: np.ndarray  # (N, V) float32: the logits each token was chosen from
    position_ids: np.ndarray  # (3, S + N - 1) t/h/w of the prompt, then of each fed-back token
    rope_delta: int  # decode positions continue at prompt length + k + rope_delta
    attentions: list[list[np.ndarray | None]] | None  # [step][layer] (heads, S_k, T_k); None without --with_attentions
    cache_history: list[CacheRecord]  # one record per step (prefill, then decode steps)
    labels: list[str]  # a readable label per token of input_ids + tokens
    top_ids: np.ndarray  # (N, K) the K most likely next tokens per step, most likely first
    top_labels: list[list[str]]  # (N, K) their readable labels
    config: ModelConfig
    image_grid_thw: np.ndarray | None = None  # (n_images, 3)
    images: list[np.ndarray] | None = None  # RGB (H, W, 3) per image, at the size the vision tower saw

    # -- sizes -------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return len(self.tokens)

    @property
    def prompt_length(self) -> int:
        return len(self.input_ids)

    @property
    def sequence(self) -> np.ndarray:
        """(S + N,) prompt followed by the generated tokens."""
        return np.concatenate([self.input_ids, self.tokens])

    @property
    def seen_length(self) -> int:
        """Tokens the decoder processed: the prompt and every generated token but the last."""
        return self.prompt_length + self.n_steps - 1

    def query_index(self, step: int) -> int:
        """Sequence index of the (last) token the decoder processed at `step`."""
        self._check_step(step)
        return self.prompt_length - 1 + step

    # -- probabilities -----------------------------------------------------------------------
    def probs(self, step: int) -> np.ndarray:
        """(V,) float64 softmax of the step's logits."""
        self._check_step(step)
        return softmax(self.logits[step])

    def top_k(self, step: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The k most likely next tokens at `step`: (ids (k,), probabilities (k,)), most likely first."""
        p = self.probs(step)
        ids = top_ids(self.logits[step], k)
        return ids, p[ids]

    @property
    def entropy(self) -> np.ndarray:
        """(N,) entropy in nats of each step's next-token distribution."""
        return entropy(self.logits)

    # -- cache -------------------------------------------------------------------------------
    @property
    def cache_lengths(self) -> np.ndarray:
        """(N,) cached positions after each step, read from the cache's own records."""
        return np.array([r.length for r in self.cache_history], np.int64)

    @property
    def cache_bytes(self) -> np.ndarray:
        """(N, layers) bytes of keys + values per layer after each step."""
        return np.array([r.layer_bytes for r in self.cache_history], np.int64)

    # -- attention ---------------------------------------------------------------------------
    @property
    def has_attentions(self) -> bool:
        return self.attentions is not None

    def _need_attentions(self) -> list[list[np.ndarray]]:
        if self.attentions is None:
            raise UserError("this trace has no attention values: the model folder was exported without them; "
                            "re-export with `qwen3vl-lab export --with_attentions`")
        return self.attentions

    def layer_attention(self, step: int, layer: int) -> np.ndarray:
        """(heads, S_k, T_k) attention probabilities of one layer at one step."""
        self._check_step(step)
        attns = self._need_attentions()
        if not -len(attns[step]) <= layer < len(attns[step]):
            raise UserError(f"layer {layer} is out of range; the model has {len(attns[step])} layers")
        a = attns[step][layer]
        if a is None:
            raise UserError(f"layer {layer} was not kept; record the trace with attention_layers including {layer}")
        return a

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.n_steps:
            raise UserError(f"step {step} is out of range; this trace has steps 0..{self.n_steps - 1}")

    def attention_row(self, step: int, layer: int) -> np.ndarray:
        """(heads, T) how the step's last query token attended to every cached position."""
        return self.layer_attention(step, layer)[:, -1, :]

    def full_attention(self, layer: int) -> np.ndarray:
        """(heads, L, L) with L = seen_length: prefill rows, then one row per decode step (zeros above the diagonal)."""
        first = self.layer_attention(0, layer)  # (heads, S, S)
        n, s = self.seen_length, self.prompt_length
        out = np.zeros((first.shape[0], n, n), np.float32)
        out[:, :s, :s] = first
        for k in range(1, self.n_steps):
            out[:, s - 1 + k, : s + k] = self.layer_attention(k, layer)[:, 0, :]
        return out

    # -- images ------------------------------------------------------------------------------
    def layout(self) -> PromptLayout:
        """The tokens the decoder saw (prompt + every generated token but the last) with their positions."""
        n = self.seen_length
        return PromptLayout(self.sequence[:n], self.position_ids[:, :n], self.labels[:n], self.config,
                            self.image_grid_thw, self.images)

    def image_cells(self) -> list[np.ndarray]:
        """Per image, the sequence index of every image token on its merged grid (t, h/m, w/m)."""
        return self.layout().image_cells()

    def image_attention(self, step: int, layer: int, head: int | None = None, image: int = 0) -> np.ndarray:
        """(h/m, w/m) attention from the step's query token to image `image`'s cells (mean over heads by default)."""
        cells = self.image_cells()
        if not cells:
            raise UserError("this trace has no image; record it from a prompt with an image")
        if not 0 <= image < len(cells):
            raise UserError(f"image {image} is out of range; the prompt has {len(cells)} image(s)")
        row = self.attention_row(step, layer)  # (heads, T)
        row = row.mean(axis=0) if head is None else row[head]
        return row[cells[image]].mean(axis=0)  # (h/m, w/m), mean over temporal patches

    def token_kind(self) -> np.ndarray:
        """(S + N,) 0 text, 1 image, 2 video: the same split the positions use."""
        return PromptLayout(self.sequence, self.position_ids, self.labels, self.config).token_kind()


def _batch_one(prompt: Prompt) -> None:
    if prompt.input_ids.shape[0] != 1:
        raise UserError(f"record_generation takes one prompt (batch 1), got a batch of {prompt.input_ids.shape[0]}")


def _step_attentions(step, layers: Sequence[int] | None) -> list[np.ndarray] | None:
    if step.attentions is None:
        return None
    return [a[0] if layers is None or i in layers else None for i, a in enumerate(step.attentions)]  # (heads, S, T)


def record_generation(model: Model, prompt: str | Prompt, max_new_tokens: int = 8, *,
                      sampler: SamplerFn | None = None, top_k: int = 10, stop_at_eos: bool = False,
                      attention_layers: Sequence[int] | None = None, images=None, image_size=None,
                      raw: bool = False) -> GenerationTrace:
    """Generate up to max_new_tokens with the step functions and keep every step's arrays.

    prompt: text (one user turn through the chat template, or raw), or a prepared `Prompt`.
    images: paths / PIL images / arrays to put before the text (through `prepare_multimodal_prompt`);
    image_size: None = smart_resize, N = N x N. The trace keeps each image as the vision tower saw it.
    sampler: (logits (1, V), previous ids (1, T)) -> (1,); greedy by default.
    top_k: how many most-likely tokens per step get readable labels (for the probability plots).
    attention_layers: keep attention values only for these layers (all by default; a long prompt on
    a real checkpoint has layers x heads x S x S of them).
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    grid, shown = None, None
    if isinstance(prompt, Prompt):
        p = prompt
    elif images is not None:
        visuals = preprocess_visuals(model, images, None, image_size)
        grid = visuals.image_grid_thw  # (n, 3)
        shown = seen_images(visuals.pixel_values, grid, processor_config(model))
        p = prepare_multimodal_prompt(model, prompt, images, image_size=image_size, raw=raw)
    else:
        p = prepare_prompt(model, prompt, raw=raw)
    _batch_one(p)
    logits, tokens, attentions, positions = [], [], [], []
    for s in generate_step(model, p, sampler or greedy, max_new_tokens, eos_token_ids=None if stop_at_eos else []):
        logits.append(s.logits[0])  # (V,)
        attentions.append(_step_attentions(s.step, attention_layers))
        positions.append(s.step.position_ids[:, 0])  # (3, S) at prefill, then (3, 1) per decode step
        tokens.append(int(s.tokens[0]))
    step = s.step
    ids = p.input_ids[0]
    logits = np.stack(logits).astype(np.float32)  # (N, V)
    best = top_ids(logits, top_k)  # (N, K)
    return GenerationTrace(
        input_ids=ids, tokens=np.array(tokens, np.int64), logits=logits,
        position_ids=np.concatenate(positions, axis=1), rope_delta=int(p.positions.rope_deltas[0, 0]),
        attentions=None if attentions[0] is None else attentions, cache_history=list(step.cache.history),
        labels=token_labels(model.tokenizer, [*ids.tolist(), *tokens], model.config), top_ids=best,
        top_labels=[token_labels(model.tokenizer, row, model.config) for row in best.tolist()], config=model.config,
        image_grid_thw=grid, images=shown,
    )
