"""What the model wanted to say at each step: top-k next tokens and the entropy of the distribution.

    plot_top_k(ids, probs, labels, chosen=...)     one step's k most likely tokens
    plot_entropy(entropies)                        entropy (nats) per step
    plot_step_probabilities(trace, k=5)            both, for every step of a GenerationTrace
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ..errors import UserError
from .figure import COLORS, figure_of, new_figure


def plot_top_k(ids: np.ndarray, probs: np.ndarray, labels: Sequence[str], *, chosen: int | None = None, ax=None,
               title: str | None = None):
    """Horizontal bars, most likely at the top; the chosen token (when among them) in red.

    ids (k,), probs (k,), labels (k,): token ids, their probabilities and readable text.
    """
    ids, probs = np.asarray(ids).reshape(-1), np.asarray(probs, np.float64).reshape(-1)
    if not len(ids) == len(probs) == len(labels):
        raise UserError(f"ids ({len(ids)}), probs ({len(probs)}) and labels ({len(labels)}) must have the same length")
    fig, ax = figure_of(ax, figsize=(4.8, 0.28 * len(ids) + 1.2))
    y = np.arange(len(ids))
    colors = [COLORS["chosen"] if chosen is not None and int(i) == int(chosen) else COLORS["prefill"] for i in ids]
    ax.barh(y, probs, color=colors)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{lab!r} ({int(i)})" for lab, i in zip(labels, ids)], fontsize=7)
    ax.invert_yaxis()
    for yy, p in zip(y, probs):
        ax.text(p, yy, f" {p:.3g}", va="center", fontsize=7)
    ax.set_xlim(0, max(float(probs.max()) * 1.35, 1e-6))
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("probability")
    ax.set_title(title or f"top {len(ids)} next tokens", fontsize=9)
    return fig


def plot_entropy(entropies: np.ndarray, labels: Sequence[str] | None = None, *, vocab_size: int | None = None,
                 current: int | None = None, ax=None):
    """Entropy (nats) of each step's next-token distribution; log(V) (a uniform guess) as a dashed line."""
    e = np.asarray(entropies, np.float64).reshape(-1)
    fig, ax = figure_of(ax, figsize=(6.0, 3.0))
    x = np.arange(len(e))
    ax.plot(x, e, "o-", color=COLORS["decode"])
    if vocab_size:
        ax.axhline(np.log(vocab_size), color="gray", linestyle="--", linewidth=1)
        ax.text(0, np.log(vocab_size), f" log V = {np.log(vocab_size):.2f} (uniform)", va="bottom", fontsize=7)
    if labels is not None:
        ax.set_xticks(x)
        ax.set_xticklabels([repr(lab) for lab in labels], rotation=60, fontsize=7)
    if current is not None:
        ax.axvline(current, color=COLORS["chosen"], linewidth=1.5, linestyle="--")
    ax.set_xlabel("step (chosen token)" if labels is not None else "step")
    ax.set_ylabel("entropy (nats)")
    ax.set_ylim(bottom=0)
    ax.set_title("how unsure the model was at each step", fontsize=9)
    return fig


def plot_step_probabilities(trace, k: int = 5):
    """Left: per step, the top-k tokens and their probabilities (chosen token boxed). Right: entropy per step."""
    n = trace.n_steps
    if k > trace.top_ids.shape[1]:
        raise UserError(f"the trace kept the top {trace.top_ids.shape[1]} tokens per step; ask for k <= that "
                        "or record with a larger top_k")
    tops = [trace.top_k(s, k) for s in range(n)]
    probs = np.stack([p for _, p in tops], axis=1)  # (k, N)
    fig, (ax, ax_e) = new_figure(ncols=2, figsize=(min(1.25 * n + 5.5, 18.0), 0.45 * k + 2.4),
                                 gridspec_kw={"width_ratios": [max(n, 2), 3]})
    im = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=max(float(probs.max()), 1e-6), aspect="auto")
    for s, (ids, p) in enumerate(tops):
        labels = trace.top_labels[s]
        for r, (i, pr) in enumerate(zip(ids, p)):
            ax.text(s, r, f"{labels[r]!r}\n{pr:.2g}", ha="center", va="center", fontsize=6)
            if int(i) == int(trace.tokens[s]):
                ax.add_patch(Rectangle((s - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=COLORS["chosen"], linewidth=2))
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"{s}" for s in range(n)], fontsize=7)
    ax.set_yticks(range(k))
    ax.set_yticklabels([f"#{r + 1}" for r in range(k)], fontsize=7)
    ax.set_xlabel("step (0 = prefill); red box = the token chosen")
    ax.set_title(f"top {k} next tokens per step", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    plot_entropy(trace.entropy, vocab_size=trace.config.text.vocab_size, ax=ax_e)
    fig.tight_layout()
    return fig
