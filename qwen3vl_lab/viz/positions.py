"""Qwen3-VL's 3-D (t, h, w) positions and the interleaved MRoPE channels they drive.

    plot_positions(position_ids, labels, kinds)            t/h/w of every token: text, image, text
    plot_image_positions(position_ids, cells)              one image's h and w ids on its cell grid
    plot_mrope_channels(text_config, position=(t, h, w))   which axis rotates each channel, and how fast

`position_ids` is (3, S) (or (3, 1, S), as `build_positions` returns it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Rectangle

from ..config import TextConfig
from ..errors import UserError
from ..positions import mrope_channel_axes
from ..rope import mrope_inv_freq_by_axis
from .figure import COLORS, figure_of, new_figure, tick_labels

AXES = ("t", "h", "w")


def _rows(position_ids: np.ndarray) -> np.ndarray:
    p = np.asarray(position_ids)
    if p.ndim == 3:
        if p.shape[1] != 1:
            raise UserError(f"position_ids has batch {p.shape[1]}; pass one row, e.g. position_ids[:, 0]")
        p = p[:, 0]
    if p.ndim != 2 or p.shape[0] != 3:
        raise UserError(f"position_ids has shape {p.shape}; expected (3, S) rows t, h, w")
    return p  # (3, S)


def _spans(kinds: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal kind -> [(kind, start, end)], end exclusive."""
    out, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            out.append((int(kinds[start]), start, i))
            start = i
    return out


def plot_positions(position_ids: np.ndarray, labels: Sequence[str] | None = None, *,
                   kinds: np.ndarray | None = None, highlight: int | None = None, axes=None):
    """Three rows, t, h and w, of every token's position; image/video tokens shaded.

    Text tokens climb one by one on all three rows together; an image's tokens share one t while h
    and w walk its grid; the text after it resumes at start + max(h, w)/2, not at the token count.
    """
    p = _rows(position_ids)
    S = p.shape[1]
    if axes is None:
        fig, axes = new_figure(nrows=3, figsize=(max(7.0, min(0.12 * S + 3, 16.0)), 5.2), sharex=True)
    fig = axes[0].figure
    x = np.arange(S)
    for r, ax in enumerate(axes):
        ax.step(x, p[r], where="mid", color=COLORS["THW"[r]], linewidth=1.2)
        ax.plot(x, p[r], ".", color=COLORS["THW"[r]], markersize=3)
        ax.set_ylabel(AXES[r], rotation=0, labelpad=10, fontsize=10)
        if kinds is not None:
            for kind, a, b in _spans(np.asarray(kinds)[:S]):
                if kind:
                    ax.axvspan(a - 0.5, b - 0.5, color=COLORS["image" if kind == 1 else "video"], alpha=0.15)
        if highlight is not None:
            ax.axvline(highlight, color=COLORS["chosen"], linewidth=1)
            ax.plot([highlight], [p[r, highlight]], "o", color=COLORS["chosen"], markersize=6)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    if labels is not None and S <= 64:
        tick_labels(axes[-1], list(labels)[:S], "x")
    axes[-1].set_xlabel("token index" + (" (shaded: image tokens)" if kinds is not None and np.any(kinds) else ""))
    title = "3-D positions (t, h, w) of every token"
    if highlight is not None:
        title += f"; token {highlight}: (t, h, w) = {tuple(int(v) for v in p[:, highlight])}"
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_image_positions(position_ids: np.ndarray, cells: np.ndarray, *, highlight: int | None = None, axes=None):
    """One image's h and w position ids on its (h/2, w/2) cell grid, each cell annotated.

    cells (t, gh, gw) or (gh, gw): the sequence index of each cell's token (`image_token_cells`).
    """
    p = _rows(position_ids)
    c = np.asarray(cells)
    c = c[0] if c.ndim == 3 else c  # first temporal patch
    gh, gw = c.shape
    if axes is None:
        fig, axes = new_figure(ncols=2, figsize=(min(2 * (0.45 * gw + 1.2), 14.0), min(0.45 * gh + 1.3, 8.0)))
    fig = axes[0].figure
    t0 = int(p[0, c[0, 0]])
    for ax, r, name in ((axes[0], 1, "h"), (axes[1], 2, "w")):
        grid = p[r][c]  # (gh, gw)
        ax.imshow(grid, cmap="Blues" if r == 1 else "Greens", aspect="equal")
        if gh * gw <= 400:
            for i in range(gh):
                for j in range(gw):
                    ax.text(j, i, str(int(grid[i, j])), ha="center", va="center", fontsize=7 if gw < 16 else 5)
        if highlight is not None and highlight in c:
            i, j = np.argwhere(c == highlight)[0]
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=COLORS["chosen"], linewidth=2))
        ax.set_title(f"{name} id per cell", fontsize=9)
        ax.set_xlabel("cell column")
        ax.set_ylabel("cell row")
    fig.suptitle(f"image grid {gh} x {gw} cells: every cell has t = {t0}; h walks the rows, w the columns",
                 fontsize=10)
    fig.tight_layout()
    return fig


def inv_freq_per_channel(text: TextConfig) -> np.ndarray:
    """(head_dim/2,) rotation frequency of each channel: rope_theta^(-2j/head_dim), as the decoder graph uses."""
    return mrope_inv_freq_by_axis(text).sum(axis=0)  # one non-zero row per channel


def mrope_angles(text: TextConfig, position: Sequence[int]) -> np.ndarray:
    """(head_dim/2,) rotation angle of each channel for a token at (t, h, w): its axis' id x its frequency."""
    table = mrope_inv_freq_by_axis(text).astype(np.float64)  # (3, hd/2): row a non-zero where axis a drives j
    pos = np.asarray(position, np.float64).reshape(3, 1)
    return (table * pos).sum(axis=0)


def plot_mrope_channels(text: TextConfig, *, position: Sequence[int] | None = None):
    """Top: the channel -> axis map (T/H/W interleaved, both halves). Bottom: each channel's frequency
    (log scale), and with `position=(t, h, w)` the angle that token's query/key is rotated by."""
    axes_map = mrope_channel_axes(text.mrope_section, text.head_dim)  # (hd/2,) 'T' | 'H' | 'W'
    freq = inv_freq_per_channel(text)
    half = len(axes_map)
    rows = 3 if position is not None else 2
    fig, axes = new_figure(nrows=rows, figsize=(max(7.0, min(0.09 * text.head_dim + 3, 14.0)), 1.6 + 1.7 * (rows - 1)),
                           gridspec_kw={"height_ratios": [0.5] + [1.0] * (rows - 1)})
    strip = np.array([[{"T": 0, "H": 1, "W": 2}[a] for a in np.concatenate([axes_map, axes_map])]])
    axes[0].imshow(strip, cmap=ListedColormap([COLORS["T"], COLORS["H"], COLORS["W"]]), vmin=0, vmax=2, aspect="auto")
    if text.head_dim <= 64:
        for j, a in enumerate(np.concatenate([axes_map, axes_map])):
            axes[0].text(j, 0, a, ha="center", va="center", color="white", fontsize=7)
    axes[0].axvline(half - 0.5, color="black", linewidth=1.5)
    axes[0].set_yticks([])
    counts = ", ".join(f"{a} {int((axes_map == a).sum())}" for a in "THW")
    axes[0].set_title(f"channel -> axis, head_dim {text.head_dim} (j and j + {half} pair up); "
                      f"mrope_section {list(text.mrope_section)}: {counts} per half", fontsize=9)
    j = np.arange(half)
    for a in "THW":
        sel = axes_map == a
        axes[1].semilogy(j[sel], freq[sel], "o", color=COLORS[a], label=a, markersize=4)
    axes[1].set_ylabel("frequency\n(rad / position)")
    axes[1].set_xlim(-0.5, half - 0.5)
    axes[1].legend(fontsize=7, ncol=3)
    axes[1].set_title(f"frequency of channel j: rope_theta^(-2j/{text.head_dim}), rope_theta = {text.rope_theta:g}",
                      fontsize=9)
    if position is not None:
        ang = mrope_angles(text, position)
        for a in "THW":
            sel = axes_map == a
            axes[2].bar(j[sel], ang[sel], color=COLORS[a], label=a)
        axes[2].set_yscale("symlog", linthresh=1e-3)
        axes[2].set_xlim(-0.5, half - 0.5)
        axes[2].set_ylabel("angle (rad)")
        axes[2].set_title(f"rotation angles for a token at (t, h, w) = {tuple(int(v) for v in position)}", fontsize=9)
    axes[-1].set_xlabel("frequency channel j")
    fig.tight_layout()
    return fig


def plot_token_on_image(image: np.ndarray, cell: Sequence[int], grid: Sequence[int], *, ax=None,
                        title: str | None = None):
    """The image with one merged cell (row, col) of its (gh, gw) grid outlined: the pixels one image token stands for."""
    img = np.asarray(image)
    gh, gw = (int(v) for v in grid)
    r, c = (int(v) for v in cell)
    fig, ax = figure_of(ax, figsize=(4.5, 4.5 * img.shape[0] / img.shape[1] + 0.3))
    ax.imshow(img)
    ch, cw = img.shape[0] / gh, img.shape[1] / gw
    ax.add_patch(Rectangle((c * cw - 0.5, r * ch - 0.5), cw, ch, fill=False, edgecolor=COLORS["chosen"], linewidth=2.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"cell (row {r}, col {c}) of {gh} x {gw}: {ch:.0f} x {cw:.0f} pixels", fontsize=9)
    return fig
