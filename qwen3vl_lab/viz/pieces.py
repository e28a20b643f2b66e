"""Which pieces of an export matter: image answers vs text answers, one pair of bars per model; and what one of
the pieces, DeepStack, is.

    plot_piece_accuracy(piece_accuracy(models, reference="ours"))      # qwen3vl_lab.shapes.pieces
    plot_piece_accuracy(labels=["ours", "guide"], image=[0.9, 0.1], text=[1.0, 1.0])
    plot_deepstack(vision_depth=24, deepstack_indexes=(5, 11, 17), decoder_layers=28)   # Qwen3-VL-2B's wiring

Takes the result of `shapes.pieces.piece_accuracy` (rows with `name`, `accuracy()`, `text_same`) or plain
numbers: per model, the exact-match accuracy on image questions and the share of text-only answers that
equal the reference model's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UserError
from ..stats import wilson_interval
from .figure import COLORS, figure_of


def _piece_rows(data, labels, image, text, reference):
    if data is not None and hasattr(data, "rows"):
        return ([r.name for r in data.rows], np.array([r.accuracy() for r in data.rows]),
                np.array([r.text_same for r in data.rows]), getattr(data, "reference", reference))
    if labels is None or image is None or text is None:
        raise UserError("pass a piece_accuracy result, or labels=, image= and text= (one value per model)")
    image, text = np.asarray(image, np.float64).reshape(-1), np.asarray(text, np.float64).reshape(-1)
    if not len(labels) == len(image) == len(text):
        raise UserError(f"{len(labels)} labels, {len(image)} image and {len(text)} text values; pass one of each per model")
    return list(labels), image, text, reference


def plot_piece_accuracy(data=None, *, labels: Sequence[str] | None = None, image=None, text=None,
                        reference: str = "reference", ax=None, title: str | None = None):
    """Per model: exact-match accuracy on image questions (green) next to the share of text-only answers equal
    to the reference model's (grey; none for the reference itself). Values are written on the bars."""
    names, acc, same, reference = _piece_rows(data, labels, image, text, reference)
    if len(names) == 0:
        raise UserError("no models to plot")
    from matplotlib.ticker import PercentFormatter  # noqa: PLC0415 (matplotlib submodule: loaded with the plot)

    fig, ax = figure_of(ax, figsize=(max(6.0, 1.6 * len(names) + 1.5), 4.2))
    x = np.arange(len(names))
    width = 0.38
    is_ref = np.array([n == reference for n in names])  # its text answers are the yardstick: no bar
    bars = ((x - width / 2, acc, np.zeros(len(names), bool), COLORS["image"], "image questions: right answers (exact match)"),
            (x + width / 2, same, is_ref, COLORS["text"], f"text-only questions: same answer as {reference}"))
    for xs, values, skip, color, label in bars:
        ax.bar(xs[~skip], values[~skip], width, color=color, label=label)
        for xi, v, s in zip(xs, values, skip):
            ax.text(xi + (0.06 if color == COLORS["image"] else 0), 0.02 if s else v + 0.015,
                    "(reference)" if s else f"{v:.0%}", ha="left" if color == COLORS["image"] else "center",
                    va="bottom", fontsize=7 if s else 8, rotation=90 if s else 0)
    counts = [r.image.table["all"] for r in data.rows] if data is not None and hasattr(data, "rows") else None
    if counts:  # the image accuracies' 95% Wilson intervals: a few dozen questions pin them to +-10 points or so
        lo_hi = np.array([wilson_interval(c["correct"], c["total"]) for c in counts])  # (models, 2)
        ax.errorbar(x - width / 2, acc, yerr=np.abs(lo_hi - acc[:, None]).T, fmt="none", ecolor="black",
                    elinewidth=0.8, capsize=3, label="95% interval (image questions)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    ax.set_title(title or "which pieces matter: image answers need them, text answers do not", fontsize=9)
    fig.tight_layout()
    return fig


def _box(ax, x: float, y: float, w: float, h: float, text: str, color: str, fontsize: int = 7) -> None:
    from matplotlib.patches import FancyBboxPatch  # noqa: PLC0415 (matplotlib submodule: loaded with the plot)

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                                edgecolor="black", linewidth=0.6, alpha=0.9))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, color: str = "black", style: str = "-|>", ls: str = "-") -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle=style, color=color, lw=1.0, linestyle=ls,
                                                          shrinkA=0, shrinkB=0))


def plot_deepstack(vision_depth: int, deepstack_indexes, decoder_layers: int, *, ax=None, title: str | None = None):
    """The DeepStack wiring of a Qwen3-VL config: the vision blocks (left, bottom to top), the decoder layers (right).

    The last vision block goes through the main merger (2 x 2 patches -> one token) and replaces the
    <|image_pad|> embeddings at the decoder's input. Each vision block listed in `deepstack_indexes` (an
    intermediate layer) goes through *its own* merger; the j-th of them is added to the hidden states at the
    image positions right after decoder layer j, for j = 0 .. D-1 (prefill only: decode steps have no image tokens).
    """
    taps = [int(i) for i in deepstack_indexes]
    if vision_depth < 1 or decoder_layers < 1 or any(not 0 <= i < vision_depth for i in taps):
        raise UserError(f"deepstack_indexes {taps} must be vision blocks 0..{vision_depth - 1}, and both stacks non-empty")
    if len(taps) > decoder_layers:
        raise UserError(f"{len(taps)} DeepStack features for {decoder_layers} decoder layers: one per layer at most")
    # show every layer that matters, and "..." for runs of layers that do not
    vis_shown = sorted({0, vision_depth - 1, *taps})
    dec_shown = sorted({*range(len(taps) + 1), decoder_layers - 1} & set(range(decoder_layers)))
    rows = max(len(vis_shown), len(dec_shown)) + 2
    fig, ax = figure_of(ax, figsize=(9.0, 0.62 * rows + 1.4))
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.6, rows)
    ax.axis("off")
    vy = {b: 0.4 + i * (rows - 1.2) / max(len(vis_shown), 1) for i, b in enumerate(vis_shown)}
    dy = {d: 0.4 + i * (rows - 1.2) / max(len(dec_shown), 1) for i, d in enumerate(dec_shown)}
    _box(ax, 0.2, -1.4, 2.2, 0.7, "image patches\n(N, 1536)", "#eeeeee")
    for b in vis_shown:
        _box(ax, 0.2, vy[b], 2.2, 0.55, f"vision block {b}", "#cfe3c8")
    for a, b in zip(vis_shown, vis_shown[1:]):
        _arrow(ax, (1.3, vy[a] + 0.55), (1.3, vy[b]), ls=":" if b - a > 1 else "-")
    _arrow(ax, (1.3, -0.7), (1.3, vy[vis_shown[0]]))
    _box(ax, 6.8, -1.4, 3.0, 0.7, "embeddings: text + merged image\n(image features replace <|image_pad|>)", "#eeeeee", 6)
    for d in dec_shown:
        _box(ax, 6.8, dy[d], 3.0, 0.55, f"decoder layer {d}", "#c8d6ea")
    for a, b in zip(dec_shown, dec_shown[1:]):
        _arrow(ax, (8.3, dy[a] + 0.55), (8.3, dy[b]), ls=":" if b - a > 1 else "-")
    _arrow(ax, (8.3, -0.7), (8.3, dy[dec_shown[0]]))
    top = vision_depth - 1  # the main merger: last block -> the decoder's input
    _box(ax, 3.6, -1.4, 2.0, 0.7, "merger\n2x2 -> 1 token", "#f3d9b1")
    _arrow(ax, (2.4, vy[top] + 0.27), (3.2, vy[top] + 0.27))
    _arrow(ax, (3.2, vy[top] + 0.27), (3.2, -1.05), style="-")
    _arrow(ax, (3.2, -1.05), (3.6, -1.05))
    _arrow(ax, (5.6, -1.05), (6.8, -1.05))
    for j, b in enumerate(taps):  # DeepStack feature j: block b -> its own merger -> added after decoder layer j
        y = vy[b] + 0.27 + (0.12 * j if b == top else 0)
        target = dy[j] + 0.55 + 0.12
        _box(ax, 3.6, y - 0.22, 2.0, 0.44, f"DeepStack merger {j}", "#f7c6a3", 6)
        _arrow(ax, (2.4, y), (3.6, y), color=COLORS["decode"])
        _arrow(ax, (5.6, y), (7.0, target), color=COLORS["decode"])
        ax.text(7.05, target, f"+ after layer {j}", fontsize=6, color=COLORS["decode"], va="bottom")
    ax.set_title(title or (f"DeepStack: {len(taps)} vision blocks {taps} each through its own merger, added after "
                           f"decoder layers 0..{len(taps) - 1} (of {decoder_layers}) at the image positions"), fontsize=9)
    return fig


__all__ = ["plot_deepstack", "plot_piece_accuracy"]
