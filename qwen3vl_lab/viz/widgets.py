"""Thin ipywidgets explorers over recorded traces.

    GenerationExplorer(trace)   a slider over the steps: attention of that step's token, top-k, cache size
    PositionExplorer(trace)     pick a token: its (t, h, w), and for an image token its cell on the image
    AttentionExplorer(trace)    pick a layer and a head: token x token attention over the whole sequence
    DoctorExplorer(trace)       fp32 vs INT4 (a DoctorTrace): pick a decode step, see the error per layer and
                                the per-channel activations of a MatMul at that step; pick a repair candidate,
                                see its answers (`viz.doctor.doctor_figure`)

Each draws with a pure function of (trace, choices) -> Figure (`generation_figure`,
`position_figure`, `attention_figure`), so they are testable without a browser, and the plots work
in a plain Python session without widgets. Moving a slider only indexes the recorded arrays: no
model runs.
"""

from __future__ import annotations

import base64

import numpy as np

from ..errors import UserError
from .attention import plot_attention, plot_attention_on_image, plot_attention_row
from .cache import plot_cache_length
from .doctor import DoctorTrace, doctor_figure
from .figure import empty_figure, new_figure
from .positions import plot_image_positions, plot_positions, plot_token_on_image
from .probs import plot_top_k
from .trace import GenerationTrace, PromptLayout


def _layer(trace: GenerationTrace, layer: int) -> int:
    n = trace.config.text.num_hidden_layers
    if not -n <= layer < n:
        raise UserError(f"layer {layer} is out of range; the model has layers 0..{n - 1}")
    return layer % n


# -- pure figure functions ---------------------------------------------------------------------
def generation_figure(trace: GenerationTrace, step: int, layer: int = -1, k: int = 8):
    """One step of a generation: what the newest token attended to (layer `layer`, every head), the
    top-k next tokens (the chosen one in red), the cache length so far, and for an image prompt the
    same attention over the image."""
    trace.query_index(step)  # range check
    layer = _layer(trace, layer)
    has_img = trace.has_attentions and trace.images is not None and bool(trace.image_cells())
    fig, axes = new_figure(nrows=2, ncols=3 if has_img else 2, figsize=(13.5 if has_img else 11.0, 6.6),
                           gridspec_kw={"height_ratios": [1.0, 1.2]})
    q = trace.query_index(step)
    T = q + 1
    if trace.has_attentions:
        gs = axes[0, 0].get_gridspec()
        for ax in axes[0]:
            ax.remove()
        ax_att = fig.add_subplot(gs[0, :])
        plot_attention_row(trace.attention_row(step, layer), trace.labels[:T], kinds=trace.token_kind()[:T], ax=ax_att,
                           title=f"layer {layer}: attention of token {q} {trace.labels[q]!r} to the {T} cached tokens")
    else:
        for ax in axes[0]:
            ax.axis("off")
        axes[0, 0].text(0, 0.5, "no attention outputs in this export (re-export with --with_attentions)", fontsize=10)
    ids, probs = trace.top_k(step, k)
    plot_top_k(ids, probs, trace.top_labels[step][:k], chosen=int(trace.tokens[step]), ax=axes[1, 0],
               title=f"step {step}: top {k} next tokens, chose {trace.labels[trace.prompt_length + step]!r}")
    plot_cache_length(trace.cache_history, current=step, ax=axes[1, 1])
    if has_img:
        w = trace.image_attention(step, layer)
        plot_attention_on_image(trace.images[0], w, ax=axes[1, 2], title=f"layer {layer}, mean over heads: image")
    fig.suptitle(f"generation step {step} of {trace.n_steps - 1}", fontsize=11)
    fig.tight_layout()
    return fig


def position_figure(layout: PromptLayout | GenerationTrace, token: int):
    """Token `token`: its (t, h, w) among all positions; for an image token, its cell on the image.

    layout: a PromptLayout (`prompt_layout(model, text, images=...)`) or a GenerationTrace.
    """
    if isinstance(layout, GenerationTrace):
        layout = layout.layout()
    S = layout.position_ids.shape[1]
    if not 0 <= token < S:
        raise UserError(f"token {token} is out of range; the prompt has tokens 0..{S - 1}")
    cells = layout.image_cells()
    fig = empty_figure(figsize=(13.0, 5.2))
    gs = fig.add_gridspec(3, 2, width_ratios=[2.2, 1.0]) if cells else fig.add_gridspec(3, 1)
    axes = [fig.add_subplot(gs[r, 0]) for r in range(3)]
    for ax in axes[1:]:
        ax.sharex(axes[0])
    plot_positions(layout.position_ids, layout.labels, kinds=layout.token_kind(), highlight=token, axes=axes)
    if cells:
        hits = [(k, np.argwhere(c == token)) for k, c in enumerate(cells)]
        hits = [(k, where[0]) for k, where in hits if len(where)]
        pos = tuple(int(v) for v in layout.position_ids[:, token])
        if hits and layout.images is not None:
            k, (_, r, c) = hits[0]
            plot_token_on_image(layout.images[k], (r, c), cells[k].shape[1:], ax=fig.add_subplot(gs[:, 1]),
                                title=f"image {k}, cell (row {r}, col {c}): (t, h, w) = {pos}")
        elif hits:
            k = hits[0][0]
            sub = gs[:, 1].subgridspec(1, 2)
            plot_image_positions(layout.position_ids, cells[k], highlight=token,
                                 axes=[fig.add_subplot(sub[0, 0]), fig.add_subplot(sub[0, 1])])
        else:
            ax = fig.add_subplot(gs[:, 1])
            ax.axis("off")
            ax.text(0.5, 0.5, f"token {token} {layout.labels[token]!r} is text:\n(t, h, w) = {pos}", ha="center",
                    va="center", fontsize=11)
    fig.tight_layout()
    return fig


def attention_figure(trace: GenerationTrace, layer: int = 0, head: int | None = None, query: int | None = None):
    """Token x token attention of one layer and head (None = mean over heads) over everything the decoder
    saw, prefill rows and decode rows together; for an image prompt also query `query`'s (default: the
    last token's) attention over the image."""
    layer = _layer(trace, layer)
    full = trace.full_attention(layer)  # (heads, L, L)
    heads = full.shape[0]
    if head is not None and not 0 <= head < heads:
        raise UserError(f"head {head} is out of range; layer {layer} has heads 0..{heads - 1}")
    cells = trace.image_cells()
    has_img = bool(cells) and trace.images is not None
    fig, axes = new_figure(ncols=2 if has_img else 1, figsize=(13.0 if has_img else 8.0, 6.5), squeeze=False)
    L = full.shape[-1]
    what = "mean over heads" if head is None else f"head {head}"
    plot_attention(full, trace.labels[:L], head=head, ax=axes[0, 0],
                   title=f"layer {layer}, {what}: rows 0..{trace.prompt_length - 1} from prefill, then one row per decode step")
    if has_img:
        q = L - 1 if query is None else query
        m = full.mean(axis=0) if head is None else full[head]  # (L, L)
        w = m[q][cells[0]].mean(axis=0)  # (gh, gw)
        plot_attention_on_image(trace.images[0], w, ax=axes[0, 1], title=f"token {q} {trace.labels[q]!r} -> image")
    fig.tight_layout()
    return fig


# -- widgets -----------------------------------------------------------------------------------
def figure_output(fig) -> dict:
    """fig as one entry of an ipywidgets Output's `outputs`: a display_data bundle (PNG, as the inline backend draws it)."""
    from IPython.core.pylabtools import print_figure  # noqa: PLC0415 - IPython only where widgets are used

    png = print_figure(fig, "png", bbox_inches="tight")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": repr(fig)}}


class _Explorer:
    """Controls + an Output that shows `self.draw()`'s figure; `self.figure` is the one last drawn.

    The figure is put into the Output by setting its `outputs` from the kernel, not by displaying inside
    `with self.out:`. Capturing with `with out:` makes a headless runner (nbclient: `jupyter execute`,
    nbmake, papermill) answer with a comm message on the shell channel while it waits for the cell's
    reply there, and the reply is then seen only when the runner's timeout ends (jupyter/nbclient#312):
    each explorer cell waited out the whole timeout. Setting `outputs` sends only kernel -> front-end
    state, which JupyterLab renders the same way.
    """

    def _build(self, controls) -> None:
        import ipywidgets as w  # noqa: PLC0415 (ipywidgets only where a widget is shown)

        self.out = w.Output()
        self.figure = None
        for c in controls:
            c.observe(self._redraw, names="value")
        self.widget = w.VBox([w.HBox(controls), self.out])
        self._redraw()

    def _redraw(self, change=None) -> None:
        self.figure = self.draw()
        self.out.outputs = (figure_output(self.figure),)

    def draw(self):  # pragma: no cover - each explorer defines it
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


class GenerationExplorer(_Explorer):
    """A slider over decode steps; a layer picker. `explorer.step.value = 3` redraws, as in the browser."""

    def __init__(self, trace: GenerationTrace, layer: int = -1, k: int = 8):
        import ipywidgets as w  # noqa: PLC0415 (ipywidgets only where a widget is shown)

        self.trace, self.k = trace, k
        n_layers = trace.config.text.num_hidden_layers
        self.step = w.IntSlider(value=0, min=0, max=trace.n_steps - 1, description="step", continuous_update=False)
        self.layer = w.Dropdown(options=list(range(n_layers)), value=_layer(trace, layer), description="layer")
        self._build([self.step, self.layer])

    def draw(self):
        return generation_figure(self.trace, self.step.value, self.layer.value, self.k)


class PositionExplorer(_Explorer):
    """A slider over the prompt's tokens: its (t, h, w) and, for an image token, its cell on the image."""

    def __init__(self, layout: PromptLayout | GenerationTrace, token: int = 0):
        import ipywidgets as w  # noqa: PLC0415 (ipywidgets only where a widget is shown)

        self.layout = layout.layout() if isinstance(layout, GenerationTrace) else layout
        self.token = w.IntSlider(value=token, min=0, max=self.layout.position_ids.shape[1] - 1, description="token",
                                 continuous_update=False)
        self._build([self.token])

    def draw(self):
        return position_figure(self.layout, self.token.value)


class AttentionExplorer(_Explorer):
    """Layer and head pickers ("mean" = average over heads) over the whole sequence's attention."""

    def __init__(self, trace: GenerationTrace, layer: int = 0, head: int | None = None):
        import ipywidgets as w  # noqa: PLC0415 (ipywidgets only where a widget is shown)

        self.trace = trace
        n_layers, n_heads = trace.config.text.num_hidden_layers, trace.config.text.num_attention_heads
        self.layer = w.Dropdown(options=list(range(n_layers)), value=_layer(trace, layer), description="layer")
        self.head = w.Dropdown(options=[("mean", None)] + [(str(h), h) for h in range(n_heads)], value=head,
                               description="head")
        self._build([self.layer, self.head])

    def draw(self):
        return attention_figure(self.trace, self.layer.value, self.head.value)


class DoctorExplorer(_Explorer):
    """A slider over fp32's answer steps, a MatMul picker (default: the one with the largest outlier ratio) and a
    repair-candidate picker. `explorer.step.value = 3` redraws, as in the browser."""

    def __init__(self, trace: DoctorTrace, step: int = 0, matmul: str | None = None, candidate: str | None = None):
        import ipywidgets as w  # noqa: PLC0415 (ipywidgets only where a widget is shown)

        self.trace = trace
        order = sorted(trace.matmuls, key=trace.ratio, reverse=True)  # the outlier-heaviest first
        self.step = w.IntSlider(value=step, min=0, max=trace.n_steps - 1, description="step", continuous_update=False)
        self.matmul = w.Dropdown(options=order, value=matmul or order[0], description="MatMul")
        names = list(trace.candidates) or ["(none)"]
        self.candidate = w.Dropdown(options=names, value=candidate or names[0], description="candidate")
        self._build([self.step, self.matmul, self.candidate])

    def draw(self):
        return doctor_figure(self.trace, self.step.value, self.matmul.value,
                             None if self.candidate.value == "(none)" else self.candidate.value)
