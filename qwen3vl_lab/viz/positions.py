"""Qwen3-VL's 3-D (t, h, w) positions and the interleaved MRoPE channels they drive.

    plot_positions(position_ids, labels, kinds)            t/h/w of every token: text, image, text
    plot_image_positions(position_ids, cells)              one image's h and w ids on its cell grid
    plot_mrope_channels(text_config, position=(t, h, w))   which axis rotates each channel, and how fast
    plot_mrope_layouts(text_config)                        blocked (Qwen2.5-VL) vs interleaved (Qwen3-VL) channels
    plot_rotation_pair(text_config, channel=0)             one 2-D rotation: channels j and j + hd/2 turning together
    plot_relative_scores(text_config)                      q . k over an image's cells: MRoPE vs 1-D positions

`position_ids` is (3, S) (or (3, 1, S), as `build_positions` returns it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.patches import Circle, Rectangle

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
    shaded = [name for kind, name in ((1, "image"), (2, "video")) if kinds is not None and np.any(np.asarray(kinds) == kind)]
    axes[-1].set_xlabel("token index" + (f" (shaded: {' and '.join(shaded)} tokens)" if shaded else ""))
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


# -- MRoPE as a teacher draws it: layouts, one rotation, the relative property ---------------------
QWEN25_VL_SECTION = (16, 24, 24)  # Qwen2.5-VL's mrope_section: blocked T 0-15, H 16-39, W 40-63 (head_dim 128)


def blocked_channel_axes(mrope_section, head_dim: int) -> np.ndarray:
    """Qwen2/2.5-VL's blocked (contiguous) layout: the first section[0] channels T, the next section[1] H, then W."""
    section = [int(s) for s in mrope_section]
    if len(section) != 3 or 2 * sum(section) != head_dim:
        raise UserError(f"mrope_section {section} must have 3 entries summing to head_dim/2 = {head_dim // 2}")
    return np.array(["T"] * section[0] + ["H"] * section[1] + ["W"] * section[2], dtype="<U1")


def plot_mrope_layouts(text: TextConfig, blocked_section=QWEN25_VL_SECTION):
    """Blocked (Qwen2.5-VL) beside interleaved (Qwen3-VL): which channel each axis gets, and so which
    frequencies (wavelengths) each axis can use. Both with this config's head_dim and rope_theta."""
    freq = inv_freq_per_channel(text)  # (hd/2,) fast (j = 0) to slow
    layouts = (("blocked (Qwen2.5-VL)", blocked_channel_axes(blocked_section, text.head_dim), blocked_section),
               ("interleaved (Qwen3-VL)", mrope_channel_axes(text.mrope_section, text.head_dim), text.mrope_section))
    fig, axes = new_figure(nrows=3, figsize=(9.0, 5.2), gridspec_kw={"height_ratios": [0.35, 0.35, 1.0]})
    cmap = ListedColormap([COLORS["T"], COLORS["H"], COLORS["W"]])
    for ax, (name, axis_map, section) in zip(axes[:2], layouts):
        ax.imshow([[{"T": 0, "H": 1, "W": 2}[a] for a in axis_map]], cmap=cmap, vmin=0, vmax=2, aspect="auto")
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_title(f"{name}, mrope_section {list(section)}: channel j = 0 .. {text.head_dim // 2 - 1} -> axis "
                     "(blue T, orange H, green W)", fontsize=9)
    wavelength = 2 * np.pi / freq  # positions per full turn
    for row, (_, axis_map, _) in enumerate(layouts):
        for k, a in enumerate("THW"):
            sel = axis_map == a
            y = row * 4 + k
            axes[2].semilogx(wavelength[sel], np.full(sel.sum(), y), "|", color=COLORS[a], markersize=10, mew=2)
            axes[2].text(wavelength.max() * 3, y, f"{a}: {wavelength[sel].min():.3g} .. {wavelength[sel].max():.3g}",
                         va="center", fontsize=7)
    axes[2].set_yticks([0, 1, 2, 4, 5, 6])
    axes[2].set_yticklabels(["blocked T", "blocked H", "blocked W", "interleaved T", "interleaved H", "interleaved W"],
                            fontsize=8)
    axes[2].invert_yaxis()
    axes[2].set_xlim(wavelength.min() / 2, wavelength.max() * 400)
    axes[2].set_xlabel("wavelength of the channel (positions per full turn, log scale): left = fast, fine detail")
    axes[2].set_title(f"which wavelengths each axis gets (head_dim {text.head_dim}, rope_theta {text.rope_theta:g})",
                      fontsize=9)
    fig.tight_layout()
    return fig


def plot_rotation_pair(text: TextConfig, channel: int = 0, positions=range(6), vector=(1.0, 0.3), *, ax=None):
    """One 2-D rotation: the pair (x_j, x_{j + hd/2}) of a query/key turned by p * freq_j for a few positions p."""
    freq = float(inv_freq_per_channel(text)[channel])
    fig, ax = figure_of(ax, figsize=(4.2, 4.2))
    x0 = np.asarray(vector, np.float64)
    ax.add_patch(Circle((0, 0), np.hypot(*x0), fill=False, color="lightgray", linestyle="--"))
    cmap = colormaps["viridis"]
    positions = list(positions)
    for i, p in enumerate(positions):
        a = p * freq
        x = np.array([x0[0] * np.cos(a) - x0[1] * np.sin(a), x0[1] * np.cos(a) + x0[0] * np.sin(a)])
        color = cmap(i / max(len(positions) - 1, 1))
        ax.annotate("", x, (0, 0), arrowprops=dict(arrowstyle="->", color=color, linewidth=2))
        ax.text(*(x * 1.12), f"p={p}", color=color, fontsize=8, ha="center", va="center")
    r = np.hypot(*x0) * 1.35
    ax.set_xlim(-r, r)
    ax.set_ylim(-r, r)
    ax.set_aspect("equal")
    half = text.head_dim // 2
    ax.set_xlabel(f"x[{channel}]")
    ax.set_ylabel(f"x[{channel + half}]")
    ax.set_title(f"channels {channel} and {channel} + {half} turn together:\n{freq:.3g} rad per position step", fontsize=9)
    fig.tight_layout()
    return fig


def rotate(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """RoPE as the decoder applies it: x (..., hd), angles (..., hd/2) -> x*cos + rotate_half(x)*sin (half-split)."""
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    half = x.shape[-1] // 2
    rotated_half = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated_half * sin


def rope_score(text: TextConfig, q: np.ndarray, k: np.ndarray, q_pos, k_pos) -> float:
    """q . k after rotating q to (t, h, w) = q_pos and k to k_pos (MRoPE angles of this config)."""
    return float(rotate(q, mrope_angles(text, q_pos)) @ rotate(k, mrope_angles(text, k_pos)))


def relative_score_maps(text: TextConfig, grid=(9, 9), query_cell=(4, 4), q=None, k=None, start: int = 10):
    """Scores of one image token's query against the keys of every cell of a (rows, cols) image, two ways:
    MRoPE (cell (r, c) at (s, s + r, s + c)) and plain 1-D RoPE (cell at s + r * cols + c, row after row).

    q, k (hd,): the vectors compared, identical by default (all ones): then only the positions decide."""
    rows, cols = grid
    q = np.ones(text.head_dim) if q is None else np.asarray(q, np.float64)
    k = q if k is None else np.asarray(k, np.float64)
    qr, qc = query_cell
    mrope, flat = np.zeros(grid), np.zeros(grid)
    for r in range(rows):
        for c in range(cols):
            mrope[r, c] = rope_score(text, q, k, (start, start + qr, start + qc), (start, start + r, start + c))
            p, pk = start + qr * cols + qc, start + r * cols + c
            flat[r, c] = rope_score(text, q, k, (p, p, p), (pk, pk, pk))
    return mrope, flat  # (rows, cols) each


def plot_relative_scores(text: TextConfig, grid=(9, 9), query_cell=(4, 4)):
    """Two heatmaps over an image's cells: the score of the marked cell's query against every cell's key,
    with MRoPE (depends on (dh, dw): a 2-D neighbourhood) and with 1-D positions (depends on r * cols + c)."""
    mrope, flat = relative_score_maps(text, grid, query_cell)
    fig, axes = new_figure(ncols=2, figsize=(9.0, 4.2))
    vmin, vmax = min(mrope.min(), flat.min()), max(mrope.max(), flat.max())
    for ax, scores, name in ((axes[0], mrope, "MRoPE: (s, s + row, s + col)"),
                             (axes[1], flat, "1-D RoPE: s + row x cols + col")):
        im = ax.imshow(scores, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.add_patch(Rectangle((query_cell[1] - 0.5, query_cell[0] - 0.5), 1, 1, fill=False,
                               edgecolor=COLORS["chosen"], linewidth=2))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cell column")
        ax.set_ylabel("cell row")
    fig.colorbar(im, ax=list(axes), fraction=0.03, label="q . k after rotation (q = k = ones)")
    fig.suptitle(f"score of the red cell's query against each cell's key, {grid[0]} x {grid[1]} image, "
                 f"head_dim {text.head_dim}", fontsize=10)
    return fig
