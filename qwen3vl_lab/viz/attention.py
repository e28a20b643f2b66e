"""Attention maps from the ONNX decoder's own `attentions.{i}` outputs (a `--with_attentions` export).

    plot_attention(a, labels)                       one head: query tokens x key tokens
    plot_attention_heads(layer_attn, labels)        every head of one layer
    plot_attention_grid(attentions, labels)         layers x heads thumbnails
    plot_attention_row(row, labels)                 one query token (a generated one) over every key, per head
    plot_attention_on_image(image, weights)         attention to an image's cells, drawn over the image

All take numpy arrays (probabilities, rows summing to 1) and return a matplotlib Figure.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UserError
from .figure import figure_of, new_figure, tick_labels


def _as_heads(attn: np.ndarray) -> np.ndarray:
    a = np.asarray(attn, np.float32)
    if a.ndim == 4:  # (B, heads, S, T) straight from the decoder
        if a.shape[0] != 1:
            raise UserError(f"attention has batch {a.shape[0]}; pass one row, e.g. attn[0]")
        a = a[0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise UserError(f"attention has shape {a.shape}; expected (heads, queries, keys) or (queries, keys)")
    return a  # (heads, S, T)


def plot_attention(attn: np.ndarray, labels: Sequence[str] | None = None, *, head: int | None = None,
                   query_labels: Sequence[str] | None = None, title: str | None = None, ax=None):
    """Token x token heatmap of one head (or the mean over heads when head is None).

    attn (heads, S, T) or (S, T). labels: one per key token (T); the queries are the last S of them
    unless query_labels are given (a decode step has S = 1 query: the newest token).
    """
    a = _as_heads(attn)
    m = a.mean(axis=0) if head is None else a[head]  # (S, T)
    S, T = m.shape
    fig, ax = figure_of(ax, figsize=(max(4.0, 0.18 * T + 2), max(3.0, 0.18 * S + 1.5)))
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=max(float(m.max()), 1e-6), aspect="auto", interpolation="nearest")
    if labels is not None:
        if len(labels) < T:
            raise UserError(f"{len(labels)} labels for {T} key tokens; pass one label per token")
        keys = list(labels)[:T]
        tick_labels(ax, keys, "x")
        tick_labels(ax, list(query_labels) if query_labels is not None else keys[T - S:], "y")
    ax.set_xlabel("key token (attended to)")
    ax.set_ylabel("query token")
    ax.set_title(title or ("mean over heads" if head is None else f"head {head}"), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return fig


def plot_attention_heads(layer_attn: np.ndarray, labels: Sequence[str] | None = None, *, layer: int | None = None,
                         max_cols: int = 4):
    """Every head of one layer side by side: (heads, S, T)."""
    a = _as_heads(layer_attn)
    heads, S, T = a.shape
    cols = min(heads, max_cols)
    rows = -(-heads // cols)
    side = 2.6 if T > 24 else 2.2
    fig, axes = new_figure(nrows=rows, ncols=cols, figsize=(side * cols + 0.5, side * rows + 0.6), squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(a[h], cmap="viridis", vmin=0.0, vmax=max(float(a[h].max()), 1e-6), aspect="auto",
                  interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=8)
        if labels is not None and T <= 24:
            tick_labels(ax, list(labels)[:T], "x", fontsize=6)
            tick_labels(ax, list(labels)[T - S:T], "y", fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("attention" + ("" if layer is None else f", layer {layer}") + " (rows: queries, columns: keys)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_attention_grid(attentions: Sequence[np.ndarray], labels: Sequence[str] | None = None, *,
                        layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                        notes: dict[tuple[int, int], str] | None = None, kv_heads: int | None = None,
                        span: tuple[int, int, str] | None = None):
    """Layers x heads thumbnails (like bertviz's model view), from per-layer (heads, S, T) arrays.

    Every thumbnail: queries down (rows), keys across (columns), one colour scale 0..1 (the colour bar).
    notes: a line under a thumbnail's title, per (layer, head), e.g. "sink 0.8" or "previous 0.9".
    kv_heads: with grouped-query attention, title each head with the key/value head it reads (head h reads
    kv head h // (heads / kv_heads)). span: (first, last, name) key tokens to mark on every thumbnail's
    x axis, e.g. the image tokens.
    """
    layers = list(range(len(attentions))) if layers is None else list(layers)
    first = _as_heads(attentions[layers[0]])
    heads = list(range(first.shape[0])) if heads is None else list(heads)
    group = first.shape[0] // kv_heads if kv_heads else None
    fig, axes = new_figure(nrows=len(layers), ncols=len(heads), squeeze=False, layout="constrained",
                           figsize=(1.9 * len(heads) + 1.6, 1.9 * len(layers) + 1.0))
    im = None
    for r, layer in enumerate(layers):
        a = _as_heads(attentions[layer])
        for c, h in enumerate(heads):
            ax = axes[r][c]
            im = ax.imshow(a[h], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if span is not None:
                ax.axvspan(span[0] - 0.5, span[1] + 0.5, ymin=0, ymax=0.04, color="#55a868", clip_on=False)
            title = f"L{layer} head {h}" + (f" (kv {h // group})" if group else "")
            note = (notes or {}).get((layer, h))
            ax.set_title(title + (f"\n{note}" if note else ""), fontsize=7)
            if r == len(layers) - 1:
                ax.set_xlabel("key ->", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"layer {layer}\n<- query", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention probability")
    n = first.shape[-1]
    names = f": {labels[0]} ... {labels[n - 1]}" if labels is not None else ""
    marked = f"; green: {span[2]}" if span is not None else ""
    fig.suptitle(f"attention per layer and head (rows: queries, columns: keys; {n} tokens{names}{marked})", fontsize=9)
    return fig


def plot_attention_row(row: np.ndarray, labels: Sequence[str] | None = None, *, query: str | None = None,
                       kinds: np.ndarray | None = None, ax=None, title: str | None = None):
    """One query token's attention over every key, one line of pixels per head: row (heads, T) or (T,).

    kinds (T,): 0 text, 1 image, 2 video, marked under the axis so image tokens stand out.
    """
    r = np.asarray(row, np.float32)
    r = r[None] if r.ndim == 1 else r  # (heads, T)
    heads, T = r.shape
    fig, ax = figure_of(ax, figsize=(max(5.0, 0.16 * T + 2), 0.35 * heads + 2.2))
    im = ax.imshow(r, cmap="magma", vmin=0.0, vmax=max(float(r.max()), 1e-6), aspect="auto", interpolation="nearest")
    ax.set_yticks(range(heads))
    ax.set_yticklabels([f"h{h}" for h in range(heads)], fontsize=7)
    if labels is not None:
        tick_labels(ax, list(labels)[:T], "x")
    if kinds is not None:
        img = np.flatnonzero(np.asarray(kinds)[:T] > 0)
        if len(img):
            ax.axvspan(img.min() - 0.5, img.max() + 0.5, ymin=0, ymax=0.03, color="#55a868", clip_on=False)
    default = f"attention of {query!r} to every cached token" if query else "attention of one query token"
    ax.set_title(title or default, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    return fig


def upsample_grid(weights: np.ndarray, height: int, width: int) -> np.ndarray:
    """(gh, gw) cell values -> (height, width) pixels, each cell a constant block (nearest neighbour)."""
    w = np.asarray(weights, np.float32)
    rows = (np.arange(height) * w.shape[0]) // height
    cols = (np.arange(width) * w.shape[1]) // width
    return w[rows][:, cols]


def plot_attention_on_image(image: np.ndarray, weights: np.ndarray, *, ax=None, title: str | None = None,
                            alpha: float = 0.6):
    """Attention to an image's merged cells (gh, gw) as a heatmap over the (H, W, 3) image it came from.

    Each merged cell covers (H / gh) x (W / gw) pixels: 32 x 32 for Qwen3-VL (16-pixel patches, 2 x 2 merge).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise UserError(f"image has shape {img.shape}; expected an RGB (H, W, 3) array")
    w = np.asarray(weights, np.float32)
    if w.ndim != 2:
        raise UserError(f"weights have shape {w.shape}; expected the image's cell grid (h/2, w/2)")
    fig, ax = figure_of(ax, figsize=(5.0, 5.0 * img.shape[0] / img.shape[1] + 0.4))
    ax.imshow(img)
    heat = upsample_grid(w, img.shape[0], img.shape[1])
    im = ax.imshow(heat, cmap="inferno", alpha=alpha, vmin=0.0, vmax=max(float(w.max()), 1e-9))
    gh, gw = w.shape
    ax.set_xticks(np.arange(gw + 1) * img.shape[1] / gw - 0.5, minor=True)
    ax.set_yticks(np.arange(gh + 1) * img.shape[0] / gh - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.3, alpha=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    ax.set_title(title or f"attention to the image's {gh} x {gw} cells", fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return fig
