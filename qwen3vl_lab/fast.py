"""The fast generation path: model-fast.onnx with KV buffers allocated once and bound through IOBinding.

    model = load_model("OUT", "int4", open_decoder=False)       # the teaching decoder is not needed here
    prompt = prepare_prompt(model, "Hello")                     # or prepare_multimodal_prompt (images, DeepStack)
    for token in fast_generate_tokens(model, prompt, sampler, max_new_tokens=50):
        ...                                                     # the same tokens generate_tokens yields

What makes it fast (ONNX_ANCHORS.md §1.8, §7, §8.3):
- the decoder is `export/decoder_fast.py`'s graph: fused RMSNorm, MRoPE and GroupQueryAttention;
- per layer one key and one value buffer (B, kv, capacity, hd) is allocated when generation starts and
  bound both as `past_key_values.*` and as `present.*`: GroupQueryAttention writes each new position in
  place, so no step reallocates or copies the cache;
- every decode input (embedding, positions, seqlens_k, total length, zero DeepStack) and the logits
  output are numpy arrays bound once and overwritten in place; the embedding row is copied from a
  memory map of the exported table straight into the decoder's input. A decode step is one
  `run_with_iobinding` call and a few tiny writes;
- prefill keeps the logits of the last position only (`logits_to_keep` 1: the lm_head runs on one row).

The teaching path (steps.py + cache.py: a growing, inspectable cache) computes the same tokens.
Rows must not be left-padded: GroupQueryAttention keeps each row's tokens at the start of its buffer
(batches of equal-length prompts work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import UserError
from .layout import EMBEDDING_FILE
from .model import Model
from .rope import rope_cache

Sampler = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (logits (B, V), previous ids (B, T)) -> (B,)


@dataclass
class FastTimings:
    """Where the time of one generation went (seconds), for `qwen3vl-lab bench`."""

    prefill: float = 0.0  # the prefill call, prompt embeddings in -> first logits out
    decode: list[float] = field(default_factory=list)  # per decode step: embed + decoder + sampling + bookkeeping
    decoder_run: list[float] = field(default_factory=list)  # per decode step: embedding row + onnxruntime run


def embedding_table(model: Model) -> np.ndarray | None:
    """The embedding table (V, H) as a read-only memory map of the exported file, or None.

    The embedding graph is one Gather from this table; reading the rows in numpy saves a session
    run (and its thread pool waking next to the decoder's) per decode step. Only the rows looked up
    are ever read from disk. None when the graph is anything else (the session is used then)."""
    graph = onnx.load(str(model.folder / EMBEDDING_FILE), load_external_data=False).graph
    if [n.op_type for n in graph.node] != ["Gather"] or len(graph.initializer) != 1:
        return None
    table = graph.initializer[0]
    if table.data_type != onnx.TensorProto.FLOAT or table.data_location != onnx.TensorProto.EXTERNAL \
            or len(table.dims) != 2 or graph.node[0].input[0] != table.name:
        return None
    info = {e.key: e.value for e in table.external_data}
    return np.memmap(model.folder / info["location"], dtype=np.float32, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(table.dims))


def _bound(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue that shares `array`'s memory: writing the array changes what the session reads."""
    return ort.OrtValue.ortvalue_from_numpy(array)


class FastDecoder:
    """One generation's state: the fast session, its IOBinding and the preallocated KV buffers.

    >>> dec = FastDecoder(model, batch_size=1, capacity=prompt.length + 50)
    >>> logits = dec.prefill(prompt.inputs_embeds, prompt.positions.position_ids, prompt.deepstack)  # (B, V)
    >>> logits = dec.decode(np.array([token]), prompt.positions.rope_deltas)                        # (B, V)
    """

    def __init__(self, model: Model, batch_size: int, capacity: int):
        text = model.config.text
        self.model, self.batch_size, self.capacity = model, batch_size, capacity
        self.session = model.fast_decoder
        self.inputs = {i.name for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        self.length = 0  # positions filled in the KV buffers
        self.binding = self.session.io_binding()
        self._values: dict[str, ort.OrtValue] = {}  # the bound inputs' OrtValues, kept alive with their arrays
        shape = (batch_size, text.num_key_value_heads, capacity, text.head_dim)  # (B, kv, C, hd)
        self.keys = [np.zeros(shape, np.float32) for _ in range(text.num_hidden_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(text.num_hidden_layers)]
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            for kind, buf in (("key", k), ("value", v)):
                value = _bound(buf)
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)  # the same memory
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", value)  # is past and present
        self.cos, self.sin = rope_cache(text, capacity)  # (C, hd/2) each: positions never exceed the cache length
        self.seqlens_k = np.zeros((batch_size,), np.int32)  # (B,) total length - 1
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((batch_size, 1, text.vocab_size), np.float32)  # (B, 1, V): last position only
        self.keep_one = np.array(1, np.int64)
        for name, array in (("cos_cache", self.cos), ("sin_cache", self.sin), ("seqlens_k", self.seqlens_k),
                            ("total_sequence_length", self.total), ("logits_to_keep", self.keep_one)):
            self._bind_input(name, array)
        self.binding.bind_ortvalue_output("logits", _bound(self.logits))
        # decode-step inputs, bound once after prefill
        H = text.hidden_size
        self.step_ids = np.zeros((batch_size, 1), np.int64)  # (B, 1)
        self.step_embeds = np.zeros((batch_size, 1, H), np.float32)  # (B, 1, H)
        self.step_positions = np.zeros((3, batch_size, 1), np.int64)  # (3, B, 1)
        self.step_deepstack = np.zeros((model.config.num_deepstack, batch_size, 1, H), np.float32)  # zeros
        self.table = embedding_table(model)  # (V, H) memory map, or None: run the embedding session
        if self.table is None:
            self.embed_binding = model.embedding.io_binding()
            self.embed_binding.bind_ortvalue_input("input_ids", _bound(self.step_ids))
            self.embed_binding.bind_ortvalue_output("inputs_embeds", _bound(self.step_embeds))

    def _bind_input(self, name: str, array: np.ndarray) -> None:
        if name in self.inputs:
            self._values[name] = _bound(array)
            self.binding.bind_ortvalue_input(name, self._values[name])

    def _run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def prefill(self, inputs_embeds: np.ndarray, position_ids: np.ndarray,
                deepstack: np.ndarray | None = None) -> np.ndarray:
        """The prompt (B, S, H) with positions (3, B, S) -> logits (B, V) of its last position; fills the buffers."""
        B, S, H = inputs_embeds.shape
        if B != self.batch_size or self.length + S > self.capacity:
            raise UserError(f"a prefill of {B} x {S} tokens does not fit buffers of {self.batch_size} x "
                            f"{self.capacity - self.length} free positions; start a new FastDecoder")
        position_ids = np.ascontiguousarray(position_ids, np.int64)  # (3, B, S)
        if int(position_ids.max(initial=0)) >= self.capacity:
            raise UserError(f"position {int(position_ids.max())} is beyond the rope cache ({self.capacity} rows)")
        if deepstack is None:
            deepstack = np.zeros((self.model.config.num_deepstack, B, S, H), np.float32)  # (D, B, S, H)
        self._bind_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, np.float32))
        self._bind_input("position_ids", position_ids)
        self._bind_input("deepstack_embeds", np.ascontiguousarray(deepstack, np.float32))
        self.length += S
        self.total[...] = self.length
        self.seqlens_k[:] = self.length - 1
        self._run()
        self._bind_decode_inputs()
        return self.logits[:, -1]  # (B, V), a view: valid until the next step

    def _bind_decode_inputs(self) -> None:
        self._bind_input("inputs_embeds", self.step_embeds)
        self._bind_input("position_ids", self.step_positions)
        self._bind_input("deepstack_embeds", self.step_deepstack)

    def decode(self, token_ids: np.ndarray, rope_deltas: np.ndarray, timings: FastTimings | None = None
               ) -> np.ndarray:
        """One new token per row (B,) -> logits (B, V); the buffers grow by one position, in place."""
        if self.length >= self.capacity:
            raise UserError(f"the KV buffers are full ({self.capacity} positions); start a new FastDecoder "
                            "with a larger capacity")
        self.step_ids[:, 0] = token_ids
        self.step_positions[:] = (self.length + np.asarray(rope_deltas, np.int64).reshape(1, -1, 1))  # (3, B, 1)
        self.length += 1
        self.total[...] = self.length
        self.seqlens_k[:] = self.length - 1
        t0 = time.perf_counter()
        if self.table is not None:
            np.take(self.table, self.step_ids[:, 0], axis=0, out=self.step_embeds[:, 0])  # (B, H) rows
        else:
            self.model.embedding.run_with_iobinding(self.embed_binding)  # writes step_embeds
        self._run()
        if timings is not None:
            timings.decoder_run.append(time.perf_counter() - t0)
        return self.logits[:, -1]  # (B, V)


def check_fast_prompt(prompt) -> None:
    if prompt.attention_mask is not None and not np.asarray(prompt.attention_mask).all():
        raise UserError("the fast path does not take left-padded batches (GroupQueryAttention keeps each row at the "
                        "start of its buffer); batch prompts of equal length, or use the teaching path (fast=False)")


def fast_generate_tokens(model: Model, prompt, sampler: Sampler, max_new_tokens: int = 100,
                         eos_token_ids: Sequence[int] | None = None, timings: FastTimings | None = None,
                         prefill_chunk: int | None = None) -> Iterator[int]:
    """`generate.generate_tokens` on the fast decoder: the same tokens, yielded one by one (batch of one).

    `timings` (optional) receives the prefill time and each decode step's time (`qwen3vl-lab bench`)."""
    for tokens in fast_generate_batch(model, prompt, sampler, max_new_tokens, eos_token_ids, timings, prefill_chunk):
        yield int(tokens[0])


def fast_prefill(decoder: FastDecoder, prompt, chunk: int | None = None) -> np.ndarray:
    """The prompt into the buffers, whole or `chunk` tokens at a time -> logits (B, V) of its last token."""
    S = prompt.length
    chunk = S if chunk is None else chunk
    if chunk < 1:
        raise UserError(f"prefill chunk size must be at least 1, got {chunk}")
    if chunk < S and prompt.input_ids.shape[0] > 1:
        raise UserError("GroupQueryAttention prefills a batch in one piece only; drop prefill_chunk for batches")
    for start in range(0, S, chunk):
        end = min(start + chunk, S)
        deepstack = None if prompt.deepstack is None else prompt.deepstack[:, :, start:end]  # (D, B, C, H)
        logits = decoder.prefill(prompt.inputs_embeds[:, start:end], prompt.positions.position_ids[:, :, start:end],
                                 deepstack)
    return logits


def fast_generate_batch(model: Model, prompt, sampler: Sampler, max_new_tokens: int = 100,
                        eos_token_ids: Sequence[int] | None = None, timings: FastTimings | None = None,
                        prefill_chunk: int | None = None) -> Iterator[np.ndarray]:
    """Every row of an unpadded batch (B, S) in lockstep: yields the (B,) new tokens of each step.

    Stops when row 0 ends (end-of-sequence) or after max_new_tokens; `eos_token_ids=[]` forces the
    full length (benchmarks)."""
    from .generate import check_context  # noqa: PLC0415 (generate imports this module's users)

    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_fast_prompt(prompt)
    check_context(model, prompt.length)
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    budget = min(max_new_tokens, model.context_length - prompt.length)
    B = prompt.input_ids.shape[0]
    t0 = time.perf_counter()
    decoder = FastDecoder(model, B, prompt.length + budget)
    logits = fast_prefill(decoder, prompt, prefill_chunk)
    history = prompt.input_ids
    deltas = prompt.positions.rope_deltas
    for n in range(budget):
        token = np.asarray(sampler(logits, history), np.int64).reshape(-1)  # (B,)
        if timings is not None:
            elapsed = time.perf_counter() - t0
            if n == 0:
                timings.prefill = elapsed  # buffers, prefill and the first token
            else:
                timings.decode.append(elapsed)
        yield token
        if int(token[0]) in eos or n + 1 == budget:
            return
        t0 = time.perf_counter()
        history = np.concatenate([history, token[:, None]], axis=1)
        logits = decoder.decode(token, deltas, timings)
