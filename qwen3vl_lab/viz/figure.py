"""Figures that belong to no one: made with pyplot (so Jupyter knows how to show them), then closed.

A closed figure is not drawn again by the inline backend at the end of the cell, so a plot
function's returned Figure shows exactly once; `fig.savefig(...)` works the same in a plain Python
session.
"""

from __future__ import annotations

import warnings

# Token labels of a random-weight model are often CJK/Hangul, which DejaVu Sans draws as empty boxes;
# without this filter matplotlib warns once per missing glyph per figure.
warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)

COLORS = {"prefill": "#4c72b0", "decode": "#dd8452", "text": "#8c8c8c", "image": "#55a868", "video": "#c44e52",
          "T": "#4c72b0", "H": "#dd8452", "W": "#55a868", "chosen": "#c44e52"}


def new_figure(*, nrows: int = 1, ncols: int = 1, figsize=(6.4, 4.0), **kwargs):
    """(fig, axes) like plt.subplots, with the figure already detached from pyplot."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (pyplot picks a backend when imported: only when drawing)

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, **kwargs)
    plt.close(fig)
    return fig, axes


def empty_figure(figsize=(6.4, 4.0)):
    """A figure with no axes yet (for gridspec layouts), detached from pyplot."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (pyplot picks a backend when imported: only when drawing)

    fig = plt.figure(figsize=figsize)
    plt.close(fig)
    return fig


def figure_of(ax, figsize=(6.4, 4.0)):
    """(fig, ax): draw into `ax` when given, else into a new figure."""
    if ax is not None:
        return ax.figure, ax
    return new_figure(figsize=figsize)


def tick_labels(ax, labels, axis: str = "x", max_labels: int = 48, rotation: int = 90, fontsize: int = 7) -> None:
    """Token labels on an axis; with many tokens, every n-th one."""
    n = len(labels)
    stride = max(1, -(-n // max_labels))
    ticks = list(range(0, n, stride))
    names = [labels[i] for i in ticks]
    if axis == "x":
        ax.set_xticks(ticks)
        ax.set_xticklabels(names, rotation=rotation, fontsize=fontsize)
    else:
        ax.set_yticks(ticks)
        ax.set_yticklabels(names, fontsize=fontsize)
