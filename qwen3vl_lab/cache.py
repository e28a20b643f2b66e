"""The KV cache: per-layer keys and values, the attention mask over them, and a record of its growth.

Like mlx-examples, the cache is plain data that is passed into each step and returned from it:

    step = prefill(model, embeds, positions)                      # step.cache.length == S
    step = decode_step(model, token, step.cache, deltas)          # step.cache.length == S + 1

The teaching decoder (decoder.py) feeds `keys`/`values` as the graph's past inputs, whatever the
graph calls them, and returns a new cache holding its present outputs; the fast decoder (fast.py)
keeps preallocated buffers instead.

`cache.keys[i]` is what layer i's attention has seen so far, after q/k-norm and MRoPE:
(B, kv_heads, T, head_dim). `cache.history` holds one `CacheRecord` per step (length and bytes
per layer), which the KV-cache notebook plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .config import TextConfig


@dataclass(frozen=True)
class CacheRecord:
    step: int  # 0 = prefill, then one per decode step
    kind: str  # "prefill" or "decode"
    new_tokens: int  # tokens this step added
    length: int  # cached positions after the step (T)
    layer_shapes: tuple[tuple[int, ...], ...]  # keys[i].shape per layer
    layer_bytes: tuple[int, ...]  # keys + values bytes per layer

    @property
    def nbytes(self) -> int:
        return sum(self.layer_bytes)


@dataclass
class KVCache:
    keys: list[np.ndarray]  # per layer (B, kv, T, hd)
    values: list[np.ndarray]  # per layer (B, kv, T, hd)
    attention_mask: np.ndarray  # (B, T) int64: 1 = real token, 0 = left padding
    history: list[CacheRecord] = field(default_factory=list)

    @classmethod
    def empty(cls, text: TextConfig, batch_size: int = 1) -> "KVCache":
        shape = (batch_size, text.num_key_value_heads, 0, text.head_dim)
        layers = range(text.num_hidden_layers)
        return cls([np.zeros(shape, np.float32) for _ in layers], [np.zeros(shape, np.float32) for _ in layers],
                   np.zeros((batch_size, 0), np.int64))

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def updated(self, keys: list[np.ndarray], values: list[np.ndarray], attention_mask: np.ndarray) -> "KVCache":
        """A new cache holding the decoder's present.* outputs, with this step recorded."""
        new = keys[0].shape[2] - self.length if keys else 0
        record = CacheRecord(
            step=len(self.history),
            kind="prefill" if not self.history else "decode",
            new_tokens=new,
            length=keys[0].shape[2],
            layer_shapes=tuple(k.shape for k in keys),
            layer_bytes=tuple(k.nbytes + v.nbytes for k, v in zip(keys, values)),
        )
        return replace(self, keys=keys, values=values, attention_mask=attention_mask,
                       history=[*self.history, record])

    def as_prefill(self, since: int) -> "KVCache":
        """The records from `since` on relabelled "prefill" (the chunks of one chunked prefill)."""
        history = [*self.history[:since], *(replace(r, kind="prefill") for r in self.history[since:])]
        return replace(self, history=history)


def bytes_per_token(text: TextConfig, dtype_bytes: int = 4) -> int:
    """What one cached position costs: 2 (K and V) x layers x kv_heads x head_dim x bytes."""
    return 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * dtype_bytes
