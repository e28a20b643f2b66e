"""The fast decoder: model-fast.onnx with KV buffers allocated once and bound through IOBinding.

    model = load_model("OUT", "int4", open_decoder=False)       # the teaching decoder is not needed here
    prompt = prepare_prompt(model, "Hello")                     # or prepare_multimodal_prompt (images, DeepStack)
    for t in generate_tokens(model, prompt, sampler, 50, fast=True):   # the generation loop over a FastDecoder
        ...                                                     # the same tokens the teaching decoder gives

    dec = FastDecoder(model)                                    # the Decoder interface (decoder.py):
    cache = dec.new_cache(batch_size=1, capacity=prompt.length + 50)
    step = dec.prefill(cache, prompt.inputs_embeds, prompt.positions.position_ids, deepstack=prompt.deepstack)
    step = dec.decode(step.cache, token, prompt.positions.rope_deltas)          # step.logits (B, V)

What makes it fast:
- the decoder is `export/decoder_fast.py`'s graph: fused RMSNorm, MRoPE and GroupQueryAttention;
- per layer one key and one value buffer (B, kv, capacity, hd) is allocated when generation starts and
  bound both as the past input and the present output: GroupQueryAttention writes each new position in
  place, so no step reallocates or copies the cache;
- every decode input (embedding, positions, seqlens_k, total length, zero DeepStack) and the logits
  output are numpy arrays bound once and overwritten in place; the embedding row is copied from a
  memory map of the exported table straight into the decoder's input. A decode step is one
  `run_with_iobinding` call and a few tiny writes; its logits are a view, valid until the next step;
- prefill keeps the logits of the last position only (`logits_to_keep` 1: the lm_head runs on one row).

Rows must not be left-padded: GroupQueryAttention keeps each row's tokens at the start of its buffer
(batches of equal-length prompts work).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from .decoder import Decoder, DecoderIO, Step
from .errors import UserError
from .layout import (
    COS_CACHE,
    EMBEDDING_FILE,
    EMBEDDING_INPUT,
    EMBEDDING_OUTPUT,
    POSITION_IDS,
    SEQLENS_K,
    SIN_CACHE,
    TOTAL_SEQUENCE_LENGTH,
)
from .model import Model
from .paths import external_data
from .rope import rope_cache


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
    path, offset, _ = external_data(table, model.folder, str(model.folder / EMBEDDING_FILE))  # inside the folder
    return np.memmap(path, dtype=np.float32, mode="r", offset=offset, shape=tuple(table.dims))


def _bound(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue that shares `array`'s memory: writing the array changes what the session reads."""
    return ort.OrtValue.ortvalue_from_numpy(array)


@dataclass
class FastCache:
    """One generation's buffers: per layer (B, kv, capacity, hd) keys and values, bound as past and present."""

    binding: ort.IOBinding
    keys: list[np.ndarray]  # per layer (B, kv, C, hd): positions [0, length) are filled
    values: list[np.ndarray]
    batch_size: int
    capacity: int
    length: int = 0  # positions filled
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # every bound input array, by graph input name
    values_alive: dict[str, ort.OrtValue] = field(default_factory=dict)  # their OrtValues, kept alive
    logits: np.ndarray | None = None  # (B, 1, V): the bound output
    embed_binding: ort.IOBinding | None = None  # the embedding session's, when there is no table to memory-map

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))


class FastDecoder(Decoder):
    """The Decoder interface over model-fast.onnx: `new_cache` allocates and binds, each step writes in place."""

    def __init__(self, model: Model):
        super().__init__()
        self.model, self.text = model, model.config.text
        self.session = model.fast_decoder
        self.io = DecoderIO.read(self.session)
        self.io.check_config(self.text, str(model.fast_decoder_file()))
        self.accept_missing = model.accept_missing
        self.inputs = {i.name for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        self.table = embedding_table(model)  # (V, H) memory map, or None: run the embedding session

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.model.embed(input_ids)

    def _bind_input(self, cache: FastCache, name: str | None, array: np.ndarray) -> None:
        if name in self.inputs:
            cache.arrays[name] = array
            cache.values_alive[name] = _bound(array)
            cache.binding.bind_ortvalue_input(name, cache.values_alive[name])

    def new_cache(self, batch_size: int, capacity: int) -> FastCache:
        text, io = self.text, self.io
        shape = (batch_size, text.num_key_value_heads, capacity, text.head_dim)  # (B, kv, C, hd)
        cache = FastCache(self.session.io_binding(), [np.zeros(shape, np.float32) for _ in io.past],
                          [np.zeros(shape, np.float32) for _ in io.past], batch_size, capacity)
        for (past_k, past_v), (present_k, present_v), k, v in zip(io.past, io.present, cache.keys, cache.values):
            for past, present, buf in ((past_k, present_k, k), (past_v, present_v, v)):
                value = _bound(buf)
                cache.values_alive[past] = value
                cache.binding.bind_ortvalue_input(past, value)  # the same memory
                cache.binding.bind_ortvalue_output(present, value)  # is past and present
        cos, sin = rope_cache(text, capacity)  # (C, hd/2) each: positions never exceed the cache length
        for name, array in ((COS_CACHE, cos), (SIN_CACHE, sin), (SEQLENS_K, np.zeros((batch_size,), np.int32)),
                            (TOTAL_SEQUENCE_LENGTH, np.zeros((), np.int32)), (io.logits_to_keep, np.array(1, np.int64))):
            self._bind_input(cache, name, array)
        cache.logits = np.zeros((batch_size, 1, text.vocab_size), np.float32)  # (B, 1, V): last position only
        cache.binding.bind_ortvalue_output(io.logits, _bound(cache.logits))
        H = text.hidden_size  # decode-step inputs, bound after prefill
        cache.arrays["step_ids"] = np.zeros((batch_size, 1), np.int64)  # (B, 1)
        cache.arrays["step_embeds"] = np.zeros((batch_size, 1, H), np.float32)  # (B, 1, H)
        cache.arrays["step_positions"] = np.zeros((3, batch_size, 1), np.int64)  # (3, B, 1)
        cache.arrays["step_deepstack"] = np.zeros((self.model.config.num_deepstack, batch_size, 1, H), np.float32)
        if self.table is None:
            cache.embed_binding = self.model.embedding.io_binding()
            cache.embed_binding.bind_ortvalue_input(EMBEDDING_INPUT, _bound(cache.arrays["step_ids"]))
            cache.embed_binding.bind_ortvalue_output(EMBEDDING_OUTPUT, _bound(cache.arrays["step_embeds"]))
        return cache

    def _advance(self, cache: FastCache, n: int) -> None:
        cache.length += n
        cache.arrays[TOTAL_SEQUENCE_LENGTH][...] = cache.length
        cache.arrays[SEQLENS_K][:] = cache.length - 1

    def prefill(self, cache: FastCache, inputs_embeds: np.ndarray | None, position_ids: np.ndarray, *,
                input_ids: np.ndarray | None = None, attention_mask: np.ndarray | None = None,
                deepstack: np.ndarray | None = None, logits_to_keep: int = 1) -> Step:
        """The prompt (B, S, H) with positions (3, B, S) -> logits (B, V) of its last position; fills the buffers."""
        self.check_prompt(position_ids, deepstack, input_ids, inputs_embeds)
        if attention_mask is not None and not np.asarray(attention_mask).all():
            raise UserError("the fast path does not take left-padded batches (GroupQueryAttention keeps each row at "
                            "the start of its buffer); batch prompts of equal length, or use the teaching path "
                            "(fast=False)")
        if logits_to_keep != 1:
            raise UserError("the fast decoder keeps the last position's logits only; use the teaching decoder "
                            "(fast=False) for all positions")
        B, S, H = inputs_embeds.shape
        if B > 1 and cache.length:
            raise UserError("GroupQueryAttention prefills a batch in one piece only; drop prefill_chunk for batches")
        if B != cache.batch_size or cache.length + S > cache.capacity:
            raise UserError(f"a prefill of {B} x {S} tokens does not fit buffers of {cache.batch_size} x "
                            f"{cache.capacity - cache.length} free positions; start a new cache")
        position_ids = np.ascontiguousarray(position_ids, np.int64)  # (3, B, S)
        if int(position_ids.max(initial=0)) >= cache.capacity:
            raise UserError(f"position {int(position_ids.max())} is beyond the rope cache ({cache.capacity} rows)")
        if deepstack is None:
            deepstack = np.zeros((self.model.config.num_deepstack, B, S, H), np.float32)  # (D, B, S, H)
        self._bind_input(cache, self.io.token_input, np.ascontiguousarray(inputs_embeds, np.float32))
        self._bind_input(cache, POSITION_IDS, position_ids)
        self._bind_input(cache, self.io.deepstack, np.ascontiguousarray(deepstack, np.float32))
        self._advance(cache, S)
        self.session.run_with_iobinding(cache.binding)
        self._bind_input(cache, self.io.token_input, cache.arrays["step_embeds"])  # decode steps from now on
        self._bind_input(cache, POSITION_IDS, cache.arrays["step_positions"])
        self._bind_input(cache, self.io.deepstack, cache.arrays["step_deepstack"])
        return Step(cache.logits[:, -1], cache, position_ids)  # logits (B, V): a view, valid until the next step

    def decode(self, cache: FastCache, token_ids: np.ndarray, rope_deltas: np.ndarray) -> Step:
        """One new token per row (B,) -> logits (B, V); the buffers grow by one position, in place."""
        if cache.length >= cache.capacity:
            raise UserError(f"the KV buffers are full ({cache.capacity} positions); start a new cache with a larger "
                            "capacity")
        a = cache.arrays
        a["step_ids"][:, 0] = np.asarray(token_ids).reshape(-1)
        a["step_positions"][:] = cache.length + np.asarray(rope_deltas, np.int64).reshape(1, -1, 1)  # (3, B, 1)
        self._advance(cache, 1)
        if self.table is not None:
            np.take(self.table, a["step_ids"][:, 0], axis=0, out=a["step_embeds"][:, 0])  # (B, H) rows
        else:
            self.model.embedding.run_with_iobinding(cache.embed_binding)  # writes step_embeds
        self.session.run_with_iobinding(cache.binding)
        return Step(cache.logits[:, -1], cache, a["step_positions"])  # (B, V)
