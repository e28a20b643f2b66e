"""One interface for every text decoder: prefill the prompt, then decode one token at a time.

    dec = model.teaching_decoder                      # model.onnx, a plain growing KVCache (this file)
    dec = FastDecoder(model)                          # model-fast.onnx, preallocated buffers (fast.py)
    dec = TappedDecoder(model, names)                 # model.onnx plus named intermediate outputs (taps.py)
    cache = dec.new_cache(batch_size=1, capacity=S + 20)
    step = dec.prefill(cache, inputs_embeds, position_ids, input_ids=ids, deepstack=ds)   # step.logits (B, V)
    step = dec.decode(step.cache, token_ids, rope_deltas)                                   # one more position

A decoder knows its graph's inputs and outputs by reading them (`DecoderIO.read`), not by assuming
our exporter wrote it: token ids or embeddings, 3-D / 1-D / no position input, the mask, the KV names
(`present.%d.key` or `present_key_values.%d.key`), DeepStack, `logits_to_keep`, attention outputs.
What a graph lacks is said, never papered over: an image prompt given to a decoder without 3-D
positions or without DeepStack raises `MissingPiece` naming what is missing, unless the decoder was
opened with `accept_missing=True` — then it runs and `dec.missing` says what it changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort

from .cache import KVCache
from .config import TextConfig
from .errors import UserError
from .layout import (
    ATTENTION_MASK,
    ATTENTIONS,
    DEEPSTACK_EMBEDS,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGITS,
    LOGITS_TO_KEEP,
    PAST_KV,
    POSITION_IDS,
    PRESENT_KV,
    USE_CACHE_BRANCH,
)
from .positions import next_positions


@dataclass
class Step:
    """What one decoder call produced."""

    logits: np.ndarray  # (B, V) at the last position, or (B, S, V) when all positions were kept
    cache: object  # the decoder's cache after this step (KVCache for the teaching decoder; returned, not mutated)
    position_ids: np.ndarray  # (3, B, S) the positions this step used
    attentions: list[np.ndarray] | None = None  # per layer (B, heads, S, T), from a --with_attentions export
    taps: dict[str, np.ndarray] = field(default_factory=dict)  # named intermediate tensors (taps.py)


class MissingPiece(UserError):
    """The prompt needs something this decoder graph does not have (3-D positions, DeepStack, embeddings input)."""


# -- reading a graph's I/O -----------------------------------------------------------------------
def _layer_names(names, patterns) -> tuple[tuple[str, str], ...]:
    """[(key name, value name)] per layer from names matching one of the `(\\d+).(key|value)` patterns."""
    found: dict[int, dict[str, str]] = {}
    for name in names:
        for pattern in (patterns if isinstance(patterns, tuple) else (patterns,)):
            m = re.fullmatch(pattern, name)
            if m:
                found.setdefault(int(m.group(1)), {})[m.group(2)] = name
    layers = sorted(found)
    if layers != list(range(len(layers))) or any(len(found[i]) != 2 for i in layers):
        raise UserError(f"the decoder's cache names are not one key and one value per layer 0..n-1 "
                        f"(found layers {layers}); pass a decoder exported with a KV cache")
    return tuple((found[i]["key"], found[i]["value"]) for i in layers)


def _dim(shape, i: int) -> int | None:
    return shape[i] if len(shape) > i and isinstance(shape[i], int) else None


@dataclass(frozen=True)
class DecoderIO:
    """What a decoder graph takes and gives, read from the graph itself."""

    token_input: str  # INPUTS_EMBEDS or INPUT_IDS
    positions: str  # "3d" (position_ids (3, B, S): MRoPE), "1d" ((B, S)) or "none" (rotary from the mask)
    past: tuple[tuple[str, str], ...]  # per layer: (key input, value input)
    present: tuple[tuple[str, str], ...]  # per layer: (key output, value output)
    logits: str = LOGITS
    attention_mask: str | None = ATTENTION_MASK
    deepstack: str | None = None  # DEEPSTACK_EMBEDS when the graph adds DeepStack features
    logits_to_keep: str | None = None
    use_cache_branch: str | None = None
    attentions: tuple[str, ...] = ()
    kv_heads: int | None = None  # from the past inputs' static dims, when the graph says
    head_dim: int | None = None
    hidden_size: int | None = None  # inputs_embeds' last dim
    other_inputs: tuple[str, ...] = ()  # inputs this reader does not know (a fused graph's own: fed by its decoder)

    @property
    def num_layers(self) -> int:
        return len(self.past)

    @property
    def missing(self) -> list[str]:
        """What this graph lacks against a full Qwen3-VL decoder (ours): for inspect and the doctor."""
        out = []
        if self.positions != "3d":
            out.append("3-D positions" + (" (1-D position_ids)" if self.positions == "1d" else " (no position_ids input)"))
        if self.deepstack is None:
            out.append("DeepStack (no deepstack_embeds input)")
        if self.token_input != INPUTS_EMBEDS:
            out.append("an embeddings input (takes input_ids: image features cannot be merged)")
        return out

    @classmethod
    def read(cls, session: ort.InferenceSession) -> "DecoderIO":
        inputs = {i.name: i for i in session.get_inputs()}
        optional = {i.name: i for i in session.get_overridable_initializers()}
        outputs = [o.name for o in session.get_outputs()]
        every = {**inputs, **optional}
        if LOGITS not in outputs:
            raise UserError(f"the decoder has no '{LOGITS}' output (outputs: {', '.join(outputs[:6])}...); "
                            "pass a text decoder graph")
        token = next((n for n in (INPUTS_EMBEDS, INPUT_IDS) if n in inputs), None)
        if token is None:
            raise UserError(f"the decoder takes neither {INPUTS_EMBEDS} nor {INPUT_IDS} (inputs: "
                            f"{', '.join(list(inputs)[:6])}...); pass a text decoder graph")
        past = _layer_names(every, PAST_KV)
        present = _layer_names(outputs, PRESENT_KV)
        if len(past) != len(present) or not past:
            raise UserError(f"the decoder has {len(past)} past and {len(present)} present layers; "
                            "pass a decoder exported with a KV cache for every layer")
        pos = inputs.get(POSITION_IDS)
        positions = "none" if pos is None else "3d" if len(pos.shape) == 3 else "1d"
        keep = next((n for n in LOGITS_TO_KEEP if n in every), None)
        known = {token, POSITION_IDS, ATTENTION_MASK, DEEPSTACK_EMBEDS, keep, USE_CACHE_BRANCH,
                 *(n for kv in past for n in kv)}
        past_shape = every[past[0][0]].shape
        embeds = inputs.get(INPUTS_EMBEDS)
        return cls(
            token_input=token, positions=positions, past=past, present=present,
            attention_mask=ATTENTION_MASK if ATTENTION_MASK in inputs else None,
            deepstack=DEEPSTACK_EMBEDS if DEEPSTACK_EMBEDS in every else None,
            logits_to_keep=keep, use_cache_branch=USE_CACHE_BRANCH if USE_CACHE_BRANCH in every else None,
            attentions=tuple(sorted((n for n in outputs if re.fullmatch(ATTENTIONS, n)), key=lambda n: int(n.split(".")[1]))),
            kv_heads=_dim(past_shape, 1), head_dim=_dim(past_shape, 3),
            hidden_size=None if embeds is None else _dim(embeds.shape, 2),
            other_inputs=tuple(n for n in inputs if n not in known))

    def check_config(self, text: TextConfig, where: str, *, config: str = "its config",
                     fix: str = "the config and the graph come from different models — re-export, or fix the config") -> None:
        """The graph's layers, KV shapes and hidden size agree with the config: one line naming the first
        disagreement. The one place decoders are checked against a config (ours when a session opens,
        graph_check.py, naming qwen3vl_lab.json; any other when its Decoder is built). `where` names the graph."""
        for key, what, graph, value in (("num_hidden_layers", "layers", self.num_layers, text.num_hidden_layers),
                                        ("num_key_value_heads", "KV heads", self.kv_heads, text.num_key_value_heads),
                                        ("head_dim", "as head size", self.head_dim, text.head_dim),
                                        ("hidden_size", "as hidden size", self.hidden_size, text.hidden_size)):
            if graph is not None and graph != value:
                raise UserError(f"{config} says {key} = {value} but {where} has {graph} {what}; {fix}")


# -- the interface -------------------------------------------------------------------------------
class Decoder:
    """prefill / decode over one decoder graph. Subclasses implement `new_cache` and `forward`."""

    io: DecoderIO
    text: TextConfig
    accept_missing: bool = False  # run prompts that need a piece the graph lacks (and say so in `missing_used`)

    def __init__(self) -> None:
        self.missing_used: list[str] = []  # what a prompt needed and this graph lacked (accept_missing=True)

    def new_cache(self, batch_size: int, capacity: int):
        raise NotImplementedError

    def forward(self, cache, *, input_ids: np.ndarray | None, inputs_embeds: np.ndarray | None,
                position_ids: np.ndarray, attention_mask: np.ndarray, deepstack: np.ndarray | None,
                logits_to_keep: int) -> Step:
        """New tokens (B, S) + cache -> Step. attention_mask covers past + new (B, P + S)."""
        raise NotImplementedError

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def check_prompt(self, position_ids: np.ndarray, deepstack: np.ndarray | None, input_ids, inputs_embeds) -> None:
        """Refuse (MissingPiece) or record what this prompt needs and the graph lacks."""
        needs = []
        pos = np.asarray(position_ids)
        if self.io.positions != "3d" and pos.ndim == 3 and not (pos == pos[:1]).all():
            needs.append("3-D positions: image/video tokens would get 1-D positions")
        if self.io.deepstack is None and deepstack is not None and np.any(deepstack):
            needs.append("DeepStack: the image features added after the first decoder layers would be dropped")
        if self.io.token_input == INPUT_IDS and input_ids is None:
            needs.append("an embeddings input: this decoder takes token ids, so image features cannot be merged")
        if not needs:
            return
        if not self.accept_missing:
            raise MissingPiece(f"this decoder lacks {needs[0]}; run it with --accept_missing "
                               "(accept_missing=True) to get that different answer anyway, or use an export "
                               "with 3-D positions and DeepStack (`qwen3vl-lab export`)")
        self.missing_used.extend(n for n in needs if n not in self.missing_used)

    def prefill(self, cache, inputs_embeds: np.ndarray | None, position_ids: np.ndarray, *,
                input_ids: np.ndarray | None = None, attention_mask: np.ndarray | None = None,
                deepstack: np.ndarray | None = None, logits_to_keep: int = 1) -> Step:
        """The prompt (B, S) into the cache. attention_mask (B, S): 0 marks left padding."""
        self.check_prompt(position_ids, deepstack, input_ids, inputs_embeds)
        B, S = np.shape(position_ids)[-2:]
        mask = np.ones((B, S), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        full_mask = np.concatenate([cache.attention_mask, mask], axis=1)  # (B, P + S)
        return self.forward(cache, input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                            attention_mask=full_mask, deepstack=deepstack, logits_to_keep=logits_to_keep)

    def decode(self, cache, token_ids: np.ndarray, rope_deltas: np.ndarray) -> Step:
        """One new token per row (B,) or (B, 1) -> logits (B, V) and the cache one position longer."""
        B = cache.batch_size
        ids = np.asarray(token_ids, np.int64).reshape(B, 1)  # (B, 1)
        mask = np.concatenate([cache.attention_mask, np.ones((B, 1), np.int64)], axis=1)  # (B, T + 1)
        position_ids = next_positions(mask, rope_deltas, 1)  # (3, B, 1): all three rows equal
        embeds = self.embed(ids) if self.io.token_input == INPUTS_EMBEDS else None
        return self.forward(cache, input_ids=ids, inputs_embeds=embeds, position_ids=position_ids,
                            attention_mask=mask, deepstack=None, logits_to_keep=1)

    def prefill_chunked(self, cache, inputs_embeds: np.ndarray | None, position_ids: np.ndarray, chunk_size: int, *,
                        input_ids: np.ndarray | None = None, attention_mask: np.ndarray | None = None,
                        deepstack: np.ndarray | None = None, logits_to_keep: int = 1) -> Step:
        """`prefill` in pieces of `chunk_size` tokens: the same cache and logits, less peak memory.

        A whole prefill scores every query against every key, (B, heads, S, S) floats per layer; chunk c
        scores its C queries against the cache so far plus itself, (B, heads, C, P + C). Ids, embeddings,
        positions (3, B, S), the mask and DeepStack (D, B, S, H) are sliced along S; rope_deltas stay.
        Attention probabilities are not returned (their widths differ per chunk)."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise UserError(f"prefill chunk size must be at least 1 (a whole number), got {chunk_size!r}")
        B, S = np.shape(position_ids)[-2:]
        mask = np.ones((B, S), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        wanted = S if logits_to_keep == 0 else min(logits_to_keep, S)  # logits of the last `wanted` positions
        first_record, kept = len(getattr(cache, "history", ())), []
        for start in range(0, S, chunk_size):
            end = min(start + chunk_size, S)
            here = min(end - start, max(0, wanted - (S - end)))  # how many of this chunk's positions are wanted
            piece = slice(start, end)
            step = self.prefill(cache, None if inputs_embeds is None else inputs_embeds[:, piece],
                                position_ids[..., piece], input_ids=None if input_ids is None else input_ids[:, piece],
                                attention_mask=mask[:, piece], logits_to_keep=max(here, 1),
                                deepstack=None if deepstack is None else deepstack[:, :, piece])  # (D, B, C, H)
            cache = step.cache
            if here:
                logits = step.logits if step.logits.ndim == 3 else step.logits[:, None]  # (B, n, V)
                kept.append(logits[:, -here:])
        logits = kept[-1][:, -1] if logits_to_keep == 1 else np.concatenate(kept, axis=1)  # (B, V) or (B, n, V)
        if isinstance(cache, KVCache):
            cache = cache.as_prefill(first_record)
        return Step(logits, cache, np.asarray(position_ids))


def positions_feed(io: DecoderIO, position_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """position_ids as the graph wants them: (3, B, S), (B, S) — 1-D positions count the real tokens, as a
    1-D model numbers them — or nothing (the graph derives them from the mask)."""
    if io.positions == "3d":
        return {POSITION_IDS: np.asarray(position_ids, np.int64)}
    if io.positions == "1d":
        S = np.shape(position_ids)[-1]
        one_d = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)[:, -S:]  # (B, S)
        return {POSITION_IDS: one_d.astype(np.int64)}
    return {}


class OnnxDecoder(Decoder):
    """The teaching decoder: one onnxruntime session, feeds built from `io`, a KVCache that grows per step."""

    def __init__(self, session: ort.InferenceSession, text: TextConfig, embed: Callable[[np.ndarray], np.ndarray] | None,
                 *, accept_missing: bool = False, where: str = "the decoder"):
        super().__init__()
        self.session, self.text, self._embed, self.accept_missing = session, text, embed, accept_missing
        self.io = DecoderIO.read(session)
        self.io.check_config(text, where)
        self.output_names = [o.name for o in session.get_outputs()]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        if self._embed is None:
            raise MissingPiece("this model has no embedding graph; pass an export with one (qwen3vl-embedding.onnx)")
        return self._embed(input_ids)

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        return KVCache.empty(self.text, batch_size)

    def feeds(self, cache: KVCache, *, input_ids, inputs_embeds, position_ids, attention_mask, deepstack,
              logits_to_keep) -> dict[str, np.ndarray]:
        """The graph's inputs for one call, by the names `io` read."""
        io = self.io
        B, S = np.shape(position_ids)[-2:]
        if io.token_input == INPUTS_EMBEDS:
            if inputs_embeds is None:
                raise MissingPiece("this decoder takes embeddings but the model has no embedding graph to make them; "
                                   "pass an export with one (qwen3vl-embedding.onnx)")
            feeds = {INPUTS_EMBEDS: np.asarray(inputs_embeds, np.float32)}
        else:
            feeds = {INPUT_IDS: np.asarray(input_ids, np.int64).reshape(B, S)}
        feeds.update(positions_feed(io, position_ids, attention_mask))
        if io.attention_mask:
            feeds[io.attention_mask] = np.asarray(attention_mask, np.int64)
        for (k, v), key, value in zip(io.past, cache.keys, cache.values):
            feeds[k], feeds[v] = key, value
        if io.deepstack:
            feeds[io.deepstack] = deepstack if deepstack is not None else \
                np.zeros((self.num_deepstack, B, S, self.text.hidden_size), np.float32)
        if io.logits_to_keep:
            feeds[io.logits_to_keep] = np.array(logits_to_keep, np.int64)
        if io.use_cache_branch:
            feeds[io.use_cache_branch] = np.array([cache.length > 0])
        return feeds

    @property
    def num_deepstack(self) -> int:
        """D of deepstack_embeds (D, B, S, H): the graph's static first dim."""
        if not hasattr(self, "_num_deepstack"):
            shape = next(i.shape for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
                         if i.name == self.io.deepstack)
            self._num_deepstack = shape[0] if isinstance(shape[0], int) else 0
        return self._num_deepstack

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def forward(self, cache: KVCache, *, input_ids, inputs_embeds, position_ids, attention_mask, deepstack,
                logits_to_keep) -> Step:
        out = self.run(self.feeds(cache, input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                                  attention_mask=attention_mask, deepstack=deepstack, logits_to_keep=logits_to_keep))
        keys = [out[k] for k, _ in self.io.present]
        values = [out[v] for _, v in self.io.present]
        attentions = [out[n] for n in self.io.attentions] or None
        logits = out[self.io.logits]  # (B, k, V); (B, S, V) from a graph without logits_to_keep
        if logits_to_keep > 1 and not self.io.logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if logits_to_keep == 1:
            logits = logits[:, -1]  # (B, V)
        return Step(logits, cache.updated(keys, values, attention_mask), np.asarray(position_ids), attentions,
                    {n: out[n] for n in out if n not in self._known_outputs})

    @property
    def _known_outputs(self) -> set[str]:
        return {self.io.logits, *self.io.attentions, *(n for kv in self.io.present for n in kv)}


__all__ = ["Decoder", "DecoderIO", "MissingPiece", "OnnxDecoder", "Step", "positions_feed"]
