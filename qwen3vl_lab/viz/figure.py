"""Figures that belong to no one: made with pyplot (so Jupyter knows how to show them), then closed.

A closed figure is not drawn again by the inline backend at the end of the cell, so a plot
function's returned Figure shows exactly once; `fig.savefig(...)` works the same in a plain Python
session.
"""

from __future__ import annotations

import warnings
from functools import cache
from importlib import resources

# Token labels in scripts neither DejaVu Sans nor the CJK font below draws (Thai, Ethiopic, ...) stay
# empty boxes; without this filter matplotlib warns once per missing glyph per figure.
warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)

CJK_FONT_FILE = "wqy-microhei-qwen-subset.ttf"  # data/fonts/PROVENANCE.md: Apache-2.0, the vocabulary's CJK characters

COLORS = {"prefill": "#4c72b0", "decode": "#dd8452", "text": "#8c8c8c", "image": "#55a868", "video": "#c44e52",
          "T": "#4c72b0", "H": "#dd8452", "W": "#55a868", "chosen": "#c44e52"}


@cache
def use_cjk_font() -> str:
    """Register the shipped CJK font with matplotlib as the last fallback family; returns its family name.

    Called when any qwen3vl_lab.viz module is imported, so token labels such as '的' or '한' are drawn
    instead of empty boxes. matplotlib draws each glyph with the first family in rcParams["font.family"]
    that has it, so appending keeps Latin text as before (DejaVu Sans). Idempotent."""
    import matplotlib as mpl  # noqa: PLC0415 (matplotlib is imported by every viz module anyway)
    from matplotlib import font_manager  # noqa: PLC0415

    path = str(resources.files("qwen3vl_lab") / "data" / "fonts" / CJK_FONT_FILE)
    font_manager.fontManager.addfont(path)
    family = font_manager.FontProperties(fname=path).get_name()  # 'WenQuanYi Micro Hei'
    families = mpl.rcParams["font.family"]
    if family not in families:
        mpl.rcParams["font.family"] = [*families, family]
    return family


use_cjk_font()


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
