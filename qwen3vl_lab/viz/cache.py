"""The KV cache as it grew, read from the cache's own records (`KVCache.history`, one per step).

    plot_kv_cache(step.cache.history)       cached length per step (prefill vs decode) + bytes per layer
    plot_cache_length / plot_cache_bytes    the two halves, each into its own axes
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps

from ..cache import CacheRecord
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
