"""The KV cache as it grew, read from the cache's own records (`KVCache.history`, one per step).

    plot_kv_cache(step.cache.history)       cached length per step (prefill vs decode) + bytes per layer
    plot_cache_length / plot_cache_bytes    the two halves, each into its own axes
    plot_kv_memory(text_config)             what the cache would weigh against context: fp32/fp16, GQA/full MHA
    measure_cache_speed(model)              next-token time with vs without the cache, 32 .. 2048 tokens
    plot_cache_speed(timing)                ... and where the two cross
    step_macs(text_config, S, cached)       the same comparison as a count of multiply-adds
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from matplotlib import colormaps

from ..cache import CacheRecord, bytes_per_token
from ..config import TextConfig
from ..errors import UserError
from .figure import COLORS, figure_of, new_figure


def _unit(nbytes: float) -> tuple[float, str]:
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if nbytes >= scale:
            return scale, name
    return 1, "bytes"


def cache_table(history: Sequence[CacheRecord]) -> dict[str, np.ndarray]:
    """The records as arrays: step, is_prefill, new_tokens, length (N,), layer_bytes (N, layers)."""
    if not history:
        raise UserError("the cache history is empty; run prefill (and decode steps) first")
    return {
        "step": np.array([r.step for r in history], np.int64),
        "is_prefill": np.array([r.kind == "prefill" for r in history]),
        "new_tokens": np.array([r.new_tokens for r in history], np.int64),
        "length": np.array([r.length for r in history], np.int64),
        "layer_bytes": np.array([r.layer_bytes for r in history], np.int64),
    }


def plot_cache_length(history: Sequence[CacheRecord], *, current: int | None = None, ax=None):
    """Cached positions after each step: prefill adds the whole prompt, each decode step one token."""
    t = cache_table(history)
    fig, ax = figure_of(ax, figsize=(5.0, 3.4))
    colors = [COLORS["prefill"] if p else COLORS["decode"] for p in t["is_prefill"]]
    bars = ax.bar(t["step"], t["length"], color=colors, edgecolor="white")
    if len(bars) <= 40:
        for b, new in zip(bars, t["new_tokens"]):
            ax.annotate(f"+{new}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    if current is not None:
        ax.axvline(current, color=COLORS["chosen"], linewidth=1.5, linestyle="--")
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel("cached positions T")
    ax.set_title("cache length: prefill (blue), then +1 per decode step (orange)", fontsize=9)
    ax.set_ylim(0, t["length"].max() * 1.15)
    return fig


def plot_cache_bytes(history: Sequence[CacheRecord], *, current: int | None = None, ax=None):
    """Bytes of keys + values per layer after each step, stacked: the bar's height is the cache's size."""
    t = cache_table(history)
    steps, layers = t["layer_bytes"].shape
    fig, ax = figure_of(ax, figsize=(5.0, 3.4))
    scale, unit = _unit(t["layer_bytes"].sum(axis=1).max())
    bottom = np.zeros(steps)
    cmap = colormaps["viridis"]
    for layer in range(layers):
        vals = t["layer_bytes"][:, layer] / scale
        ax.bar(t["step"], vals, bottom=bottom, color=cmap(layer / max(layers - 1, 1)), edgecolor="none",
               label=f"layer {layer}" if layers <= 8 or layer in (0, layers - 1) else None)
        bottom += vals
    if current is not None:
        ax.axvline(current, color=COLORS["chosen"], linewidth=1.5, linestyle="--")
    ax.set_xlabel("step (0 = prefill)")
    ax.set_ylabel(f"keys + values ({unit})")
    ax.set_title(f"cache bytes, stacked over {layers} layers", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    return fig


def plot_kv_cache(history: Sequence[CacheRecord], *, current: int | None = None):
    """Length (left) and bytes per layer (right) of the cache after each step, from `KVCache.history`.

    current: highlight one step (the generation explorer's slider).
    """
    fig, (ax_len, ax_bytes) = new_figure(ncols=2, figsize=(10.0, 3.6))
    plot_cache_length(history, current=current, ax=ax_len)
    plot_cache_bytes(history, current=current, ax=ax_bytes)
    fig.tight_layout()
    return fig


# -- what the cache costs and saves ----------------------------------------------------------------
def kv_bytes(text: TextConfig, context: int | np.ndarray, dtype_bytes: int = 4, kv_heads: int | None = None):
    """Bytes of keys + values for `context` cached tokens: 2 x layers x kv_heads x head_dim x dtype_bytes each.

    kv_heads=None: the config's (grouped-query attention); kv_heads=text.num_attention_heads: what full
    multi-head attention (one key/value head per query head) would keep."""
    heads = text.num_key_value_heads if kv_heads is None else kv_heads
    return bytes_per_token(replace(text, num_key_value_heads=heads), dtype_bytes) * np.asarray(context, np.int64)


def plot_kv_memory(text: TextConfig, contexts=None, *, name: str = "", ax=None):
    """KV-cache size against context: fp32 / fp16 x the config's GQA / full multi-head attention (log-log)."""
    contexts = np.unique(np.geomspace(256, text.max_position_embeddings, 40).astype(np.int64)) if contexts is None \
        else np.asarray(contexts, np.int64)
    fig, ax = figure_of(ax, figsize=(6.4, 4.0))
    H, KV = text.num_attention_heads, text.num_key_value_heads
    for heads, label, color in ((KV, f"GQA ({KV} kv heads)", COLORS["prefill"]),  # drawn first: MHA fp16 = GQA fp32
                                (H, f"full multi-head ({H} kv heads)", COLORS["decode"])):
        for dtype_bytes, style in ((4, "-"), (2, "--")):
            per_token = int(kv_bytes(text, 1, dtype_bytes, heads))
            ax.loglog(contexts, kv_bytes(text, contexts, dtype_bytes, heads) / 2**30, style, color=color,
                      label=f"{label}, {'fp32' if dtype_bytes == 4 else 'fp16'}: {per_token / 1024:g} KiB/token")
    ax.axhline(24, color="gray", linewidth=1, linestyle=":")
    ax.text(contexts[0], 24, " 24 GiB", va="bottom", fontsize=7)
    ax.set_xlabel("cached tokens (context)")
    ax.set_ylabel("keys + values (GiB)")
    ax.set_title(f"KV cache of {name or 'the model'}: {text.num_hidden_layers} layers x kv heads x head_dim "
                 f"{text.head_dim} x 2 (K, V)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def step_macs(text: TextConfig, context: int, cached: bool) -> int:
    """Multiply-adds of the decoder for the next token at `context` tokens, with or without the cache.

    Per layer and per token run through it: projections d x (q + 2 kv + o) plus the MLP 3 d x ff, i.e. O(d^2);
    attention of one query over n keys: 2 n x q_size (scores, then the weighted sum), O(n d).
    With the cache one token runs: O(d^2) + O(S d). Without it all S tokens run: O(S d^2) + O(S^2 d).
    The lm_head (d x vocab) runs on the last position only, either way."""
    d, q, kv = text.hidden_size, text.q_size, text.kv_size
    dense = d * (q + 2 * kv) + q * d + 3 * d * text.intermediate_size  # per token per layer
    if cached:
        per_layer = dense + 2 * context * q
    else:
        per_layer = context * dense + 2 * q * context * (context + 1) // 2  # causal: token i reads i + 1 keys
    return text.num_hidden_layers * per_layer + d * text.vocab_size


@dataclass
class CacheTiming:
    """Milliseconds for the next token at each context length: one decode step over the cache vs the whole
    sequence recomputed (a prefill of all S tokens, which is what each step costs without a cache)."""

    lengths: np.ndarray  # (N,) context S
    cached_ms: np.ndarray  # (N,) median decode step with S - 1 tokens cached
    recomputed_ms: np.ndarray  # (N,) median prefill of S tokens
    decoder: str  # which decoder graph was timed

    def crossover(self) -> int | None:
        """The first measured length from which on the cache is faster at every longer length (None: never)."""
        faster = self.cached_ms < self.recomputed_ms
        for i in range(len(faster)):
            if faster[i:].all():
                return int(self.lengths[i])
        return None


def measure_cache_speed(model, lengths=(32, 64, 128, 256, 512, 1024, 2048), repeats: int = 3,
                        fast: bool = True) -> CacheTiming:
    """Time the next token with and without the cache at each context length, on this machine.

    fast=True times the fast decoder (model-fast.onnx: KV buffers written in place, no attention outputs);
    False the teaching decoder (the cache copied in and out as numpy arrays every step, and attention
    probabilities returned: layers x heads x S x S floats at prefill)."""
    from ..generate import open_decoder, prepare_ids, run_prefill  # noqa: PLC0415 (only when measuring)
    from ..steps import tokenize  # noqa: PLC0415

    lengths = np.asarray(lengths, np.int64)
    decoder = open_decoder(model, fast)
    filler = tokenize(model, "The cache keeps every key and value it has seen. " * (int(lengths.max()) // 8 + 1),
                      raw=True)[0]  # (>= max S,) ordinary text tokens
    cached, recomputed = [], []
    for S in lengths:
        ids = filler[None, :S]  # (1, S)
        full, past = prepare_ids(model, ids), prepare_ids(model, ids[:, :-1])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run_prefill(model, full, decoder=decoder)  # everything recomputed: S tokens through every layer
            times.append(time.perf_counter() - t0)
        recomputed.append(np.median(times) * 1e3)
        cache = run_prefill(model, past, decoder=decoder, cache=decoder.new_cache(1, int(S) + repeats)).cache
        token, times = ids[:, -1:], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            cache = decoder.decode(cache, token, past.positions.rope_deltas).cache  # one token over S - 1 cached
            times.append(time.perf_counter() - t0)
        cached.append(np.median(times) * 1e3)
    return CacheTiming(lengths, np.array(cached), np.array(recomputed), "fast (model-fast.onnx)" if fast
                       else "teaching (model.onnx)")


def plot_cache_speed(*timings: CacheTiming, ax=None):
    """Time for the next token against context, cached (solid) vs recomputed (dashed), crossovers marked."""
    fig, ax = figure_of(ax, figsize=(6.4, 4.0))
    for i, (timing, color) in enumerate(zip(timings, (COLORS["prefill"], COLORS["decode"], COLORS["image"]))):
        ax.loglog(timing.lengths, timing.cached_ms, "o-", color=color, label=f"{timing.decoder}: with the cache")
        ax.loglog(timing.lengths, timing.recomputed_ms, "s--", color=color, label=f"{timing.decoder}: recomputed")
        cross = timing.crossover()
        if cross is not None:
            ax.axvline(cross, color=color, linewidth=1, linestyle=":")
            ax.text(cross, 0.03 + 0.07 * i, f" {timing.decoder.split()[0]}: cache wins from S = {cross}", color=color,
                    fontsize=7, transform=ax.get_xaxis_transform())  # x in data, y in axes fraction
    ax.set_xlabel("context S (tokens)")
    ax.set_ylabel("ms for the next token (median)")
    ax.set_title("next token with the cache vs recomputing the whole sequence (measured on this machine)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return fig
