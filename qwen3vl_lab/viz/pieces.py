"""Which pieces of an export matter: image answers vs text answers, one pair of bars per model.

    plot_piece_accuracy(piece_accuracy(models, reference="ours"))      # qwen3vl_lab.shapes.pieces
    plot_piece_accuracy(labels=["ours", "guide"], image=[0.9, 0.1], text=[1.0, 1.0])

Takes the result of `shapes.pieces.piece_accuracy` (rows with `name`, `accuracy()`, `text_same`) or plain
numbers: per model, the exact-match accuracy on image questions and the share of text-only answers that
equal the reference model's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UserError
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
            ax.text(xi, 0.02 if s else v + 0.015, "(reference)" if s else f"{v:.0%}", ha="center", va="bottom",
                    fontsize=7 if s else 8, rotation=90 if s else 0)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    ax.set_title(title or "which pieces matter: image answers need them, text answers do not", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["plot_piece_accuracy"]
