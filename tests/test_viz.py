"""viz/: the recorded trace holds what the step functions computed, and every plot draws those numbers.

The trace is checked against independent paths (a full recompute without cache, generate_tokens,
the decoder's attention over the whole sequence, PIL's resize); each plot is checked by reading the
drawn artists' data back; the widgets by moving their controls in plain Python (no browser).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qwen3vl_lab import viz
from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.exporter import export
from qwen3vl_lab.generate import generate_tokens, prepare_prompt
from qwen3vl_lab.model import load_model
from qwen3vl_lab.pipeline import greedy
from qwen3vl_lab.steps import build_positions, embed, prefill
from qwen3vl_lab.viz import widgets

PROMPT = "Describe a cat in one sentence."
N = 6
SIZE = (320, 256)  # -> grid (1, 20, 16), 10 x 8 cells


@pytest.fixture(scope="module")
def model(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("viz") / "onnx"
    export(tiny_dir, out, with_attentions=True, progress=False, log=lambda _: None)
    return load_model(out)


@pytest.fixture(scope="module")
def trace(model):
    return viz.record_generation(model, PROMPT, max_new_tokens=N)


@pytest.fixture(scope="module")
def photo():
    from qwen3vl_lab.apps.notebook import sample_image

    return sample_image()


@pytest.fixture(scope="module")
def image_trace(model, photo):
    return viz.record_generation(model, "Who is this?", max_new_tokens=4, images=[photo], image_size=SIZE)


# -- the trace ---------------------------------------------------------------------------------
def test_trace_tokens_logits_and_cache_equal_independent_runs(model, trace):
    ids = trace.input_ids[None]
    S = ids.shape[1]
    assert trace.tokens.tolist() == list(generate_tokens(model, prepare_prompt(model, PROMPT), greedy, N, []))
    for k in range(N):  # logits[k] came from the cache; recompute the prefix from scratch
        seq = np.concatenate([ids, trace.tokens[None, :k]], axis=1)
        fresh = prefill(model, embed(model, seq), build_positions(seq))
        assert np.abs(fresh.logits[0] - trace.logits[k]).max() < 1e-4
    assert trace.cache_lengths.tolist() == list(range(S, S + N))
    assert [r.kind for r in trace.cache_history] == ["prefill"] + ["decode"] * (N - 1)
    assert trace.position_ids.shape == (3, S + N - 1)
    assert trace.position_ids[0].tolist() == list(range(S + N - 1))  # text only: t = index
    assert len(trace.labels) == S + N and trace.labels[S] == model.tokenizer.decode([int(trace.tokens[0])])


def test_trace_probabilities_entropy_and_top_k(trace):
    for k in range(N):
        x = trace.logits[k].astype(np.float64)
        lse = np.log(np.exp(x - x.max()).sum()) + x.max()
        p = np.exp(x - lse)
        assert np.isclose(trace.entropy[k], lse - (p * x).sum(), rtol=1e-9)  # H = logsumexp - E[x]
        ids, probs = trace.top_k(k, 5)
        assert ids.tolist() == np.argsort(-x, kind="stable")[:5].tolist()
        assert np.allclose(probs, p[ids])
        assert trace.top_ids[k, 0] == trace.tokens[k]  # greedy chose the most likely token
    assert trace.top_labels[0][0] == trace.labels[trace.prompt_length]


def test_full_attention_equals_a_prefill_over_the_whole_sequence(model, trace):
    seen = trace.sequence[None, :trace.seen_length]
    fresh = prefill(model, embed(model, seen), build_positions(seen))
    for layer in range(model.config.text.num_hidden_layers):
        assert np.abs(trace.full_attention(layer) - fresh.attentions[layer][0]).max() < 1e-5
    q = trace.query_index(3)
    assert np.array_equal(trace.attention_row(3, 1), trace.full_attention(1)[:, q, : q + 1])


def test_trace_errors_are_one_line_user_errors(model, trace, tiny_dir, tmp_path):
    with pytest.raises(UserError, match="out of range"):
        trace.attention_row(N, 0)
    with pytest.raises(UserError, match="max_new_tokens"):
        viz.record_generation(model, PROMPT, max_new_tokens=0)
    plain = load_model(export(tiny_dir, tmp_path / "plain", progress=False, log=lambda _: None))
    t = viz.record_generation(plain, PROMPT, max_new_tokens=2)
    assert not t.has_attentions and t.tokens.tolist() == trace.tokens[:2].tolist()
    with pytest.raises(UserError, match="--with_attentions"):
        t.attention_row(0, 0)
    from qwen3vl_lab.apps.notebook import require_attentions

    with pytest.raises(UserError, match="--with_attentions"):
        require_attentions(plain)
    require_attentions(model)


def test_kept_layers_only(model):
    t = viz.record_generation(model, PROMPT, max_new_tokens=2, attention_layers=[1])
    assert t.layer_attention(0, 1).shape[0] == model.config.text.num_attention_heads
    with pytest.raises(UserError, match="not kept"):
        t.layer_attention(0, 0)


# -- images ------------------------------------------------------------------------------------
def test_image_trace_cells_positions_and_attention(model, image_trace, photo):
    from qwen3vl_lab.image import load_image, resize_image

    cells = image_trace.image_cells()[0][0]  # (10, 8)
    assert cells.shape == (SIZE[0] // 32, SIZE[1] // 32)
    pads = np.flatnonzero(image_trace.input_ids == model.config.image_token_id)
    assert np.array_equal(cells.reshape(-1), pads)  # row-major, consecutive
    s = int(pads[0])
    pos = image_trace.position_ids
    rows, cols = np.indices(cells.shape)
    assert (pos[0][cells] == s).all() and (pos[1][cells] == s + rows).all() and (pos[2][cells] == s + cols).all()
    w = image_trace.image_attention(2, 3, head=1)
    assert np.array_equal(w, image_trace.attention_row(2, 3)[1][cells])
    assert np.allclose(image_trace.image_attention(2, 3), image_trace.attention_row(2, 3).mean(0)[cells])
    # the picture kept in the trace is the photo at the size the vision tower saw
    shown = image_trace.images[0]
    assert shown.shape == (*SIZE, 3)
    assert np.abs(shown.astype(int) - resize_image(load_image(photo), *SIZE)).max() <= 1


def test_prompt_layout_matches_the_trace(model, image_trace, photo):
    layout = viz.prompt_layout(model, "Who is this?", images=[photo], image_size=SIZE)
    S = image_trace.prompt_length
    assert np.array_equal(layout.input_ids, image_trace.input_ids)
    assert np.array_equal(layout.position_ids, image_trace.position_ids[:, :S])
    assert layout.labels == image_trace.labels[:S]
    assert layout.token_kind().sum() == layout.image_cells()[0].size


# -- plots read back -----------------------------------------------------------------------------
def _image_data(ax):
    return np.asarray(ax.images[0].get_array())


def test_attention_plots_draw_the_matrices(trace):
    a = trace.layer_attention(0, 2)  # (heads, S, S)
    fig = viz.plot_attention(a, trace.labels, head=1)
    assert np.array_equal(_image_data(fig.axes[0]), a[1])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == trace.labels[: a.shape[-1]]
    assert np.allclose(_image_data(viz.plot_attention(a, trace.labels).axes[0]), a.mean(0))
    grid = viz.plot_attention_grid(trace.attentions[0], trace.labels)
    heads = a.shape[0]
    assert len(grid.axes) == len(trace.attentions[0]) * heads + 1  # + the colour bar
    assert np.array_equal(_image_data(grid.axes[2 * heads + 3]), trace.layer_attention(0, 2)[3])
    row = trace.attention_row(4, 0)
    assert np.array_equal(_image_data(viz.plot_attention_row(row, trace.labels).axes[0]), row)
    heads_fig = viz.plot_attention_heads(a, trace.labels, layer=2)
    assert np.array_equal(_image_data(heads_fig.axes[heads - 1]), a[heads - 1])
    with pytest.raises(UserError, match="labels"):
        viz.plot_attention(a, trace.labels[:3])


def test_attention_on_image_upsamples_each_cell_to_its_pixels(image_trace):
    from qwen3vl_lab.viz.attention import upsample_grid

    w = image_trace.image_attention(3, 0)  # (10, 8)
    fig = viz.plot_attention_on_image(image_trace.images[0], w)
    heat = np.asarray(fig.axes[0].images[1].get_array())  # images[0] is the photo
    assert heat.shape == SIZE
    assert np.array_equal(heat, upsample_grid(w, *SIZE))
    assert np.array_equal(heat[32 * 4:32 * 5, 32 * 6:32 * 7], np.full((32, 32), w[4, 6], np.float32))


def test_kv_cache_plot_draws_the_history(trace):
    fig = viz.plot_kv_cache(trace.cache_history, current=2)
    ax_len, ax_bytes = fig.axes[:2]
    assert [b.get_height() for b in ax_len.patches] == trace.cache_lengths.tolist()
    colors = {tuple(b.get_facecolor()) for b in ax_len.patches[1:]}
    assert len(colors) == 1 and tuple(ax_len.patches[0].get_facecolor()) not in colors  # prefill stands out
    L = trace.cache_bytes.shape[1]
    tops = np.zeros(N)
    for layer in range(L):  # stacked bars, in KiB: the stack's top is the cache's total size
        tops = np.maximum(tops, [b.get_y() + b.get_height() for b in ax_bytes.patches[layer * N:(layer + 1) * N]])
    assert np.allclose(tops * 1024, trace.cache_bytes.sum(axis=1))
    table = viz.cache_table(trace.cache_history)
    assert table["new_tokens"].tolist() == [trace.prompt_length] + [1] * (N - 1)


def test_position_plots_draw_the_ids(image_trace):
    layout = image_trace.layout()
    fig = viz.plot_positions(layout.position_ids, layout.labels, kinds=layout.token_kind(), highlight=10)
    for r, ax in enumerate(fig.axes[:3]):
        assert np.array_equal(ax.lines[0].get_ydata(), layout.position_ids[r])
    assert "(t, h, w) = " + str(tuple(int(v) for v in layout.position_ids[:, 10])) in fig.axes[0].get_title()
    cells = layout.image_cells()[0]
    grid_fig = viz.plot_image_positions(layout.position_ids, cells)
    assert np.array_equal(_image_data(grid_fig.axes[0]), layout.position_ids[1][cells[0]])
    assert np.array_equal(_image_data(grid_fig.axes[1]), layout.position_ids[2][cells[0]])


def test_mrope_channels_follow_the_interleaved_rule(model):
    from qwen3vl_lab.config import parse_hf_config
    from qwen3vl_lab.export.tiny import hf_config_dict
    from qwen3vl_lab.positions import mrope_channel_axes

    for text in (model.config.text, parse_hf_config(hf_config_dict("2b")).text):
        hd, theta = text.head_dim, text.rope_theta
        expected = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)  # transformers' inv_freq
        assert np.allclose(viz.inv_freq_per_channel(text), expected, rtol=1e-6)
        p = 11
        assert np.allclose(viz.mrope_angles(text, (p, p, p)), p * expected, rtol=1e-6)
        axes = mrope_channel_axes(text.mrope_section, hd)
        t, h, w = 3, 5, 9
        ang = viz.mrope_angles(text, (t, h, w))
        pos = np.select([axes == "T", axes == "H", axes == "W"], [t, h, w])
        assert np.allclose(ang, pos * expected, rtol=1e-6)
        fig = viz.plot_mrope_channels(text, position=(t, h, w))
        strip = _image_data(fig.axes[0])[0]
        assert "".join("THW"[int(v)] for v in strip) == "".join(axes) * 2


def test_probability_plots(trace):
    ids, probs = trace.top_k(2, 6)
    fig = viz.plot_top_k(ids, probs, trace.top_labels[2][:6], chosen=int(trace.tokens[2]))
    bars = fig.axes[0].patches
    assert np.allclose([b.get_width() for b in bars], probs)
    assert bars[0].get_facecolor() != bars[1].get_facecolor()  # the chosen (most likely) one is red
    fig = viz.plot_entropy(trace.entropy, vocab_size=trace.config.text.vocab_size)
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), trace.entropy)
    fig = viz.plot_step_probabilities(trace, k=4)
    assert np.allclose(_image_data(fig.axes[0]), np.stack([trace.top_k(s, 4)[1] for s in range(N)], axis=1))
    with pytest.raises(UserError, match="top"):
        viz.plot_step_probabilities(trace, k=50)


def test_int4_plots_from_arrays_and_doctor_results():
    from qwen3vl_lab.debug.compare import Comparison, TeacherForced
    from qwen3vl_lab.debug.layers import LayerReport, TensorError

    kl = np.array([0.01, 0.2, 0.05])
    fig = viz.plot_step_divergence(kl, top1_agree=[True, False, True])
    line, marks = fig.axes[0].lines[:2]
    assert np.allclose(line.get_ydata(), kl) and marks.get_xdata().tolist() == [1]
    z = np.zeros(3)
    tf = TeacherForced("p", 5, np.arange(3), np.arange(3), kl, np.array([True, False, True]), z, z, z, z, z)
    assert np.allclose(viz.plot_step_divergence(tf).axes[0].lines[0].get_ydata(), kl)
    cmp = Comparison("a", "b", [tf, tf])
    assert len([ln for ln in viz.plot_step_divergence(cmp).axes[0].lines if len(ln.get_xdata()) == 3]) == 2
    fig = viz.plot_layer_divergence([30.0, 20.0, 5.0], names=["a", "b", "c"], threshold_db=10)
    bars = fig.axes[0].patches
    assert [b.get_height() for b in bars] == [30.0, 20.0, 5.0]
    assert bars[2].get_facecolor() != bars[0].get_facecolor()
    rows = [TensorError(f"layers.{i}.{k}", i, k, 0.1, 10.0 * (i + 1) + j, 0.0, 1.0)
            for i in range(2) for j, k in enumerate(("attn_out", "mlp_out", "hidden"))]
    fig = viz.plot_layer_divergence(LayerReport("p", 2, rows))
    assert sorted(b.get_height() for b in fig.axes[0].patches) == sorted(r.sqnr_db for r in rows)
    assert len(viz.plot_int4_summary(tf, LayerReport("p", 2, rows)).axes) == 2


# -- widgets without a browser ---------------------------------------------------------------------
def test_generation_explorer_slider_redraws_from_the_trace(trace):
    ex = widgets.GenerationExplorer(trace)
    assert ex.step.max == N - 1 and ex.figure.get_suptitle().startswith("generation step 0")
    ex.step.value = 3
    assert ex.figure.get_suptitle().startswith("generation step 3")
    assert np.array_equal(_attention_axes_data(ex.figure), trace.attention_row(3, ex.layer.value))
    ex.layer.value = 0
    assert np.array_equal(_attention_axes_data(ex.figure), trace.attention_row(3, 0))
    bars = [ax for ax in ex.figure.axes if ax.get_title().startswith("step 3: top")][0].patches
    assert np.allclose([b.get_width() for b in bars], trace.top_k(3, 8)[1])


def _attention_axes_data(fig):
    ax = next(a for a in fig.axes if a.get_title().startswith("layer ") and a.images)
    return _image_data(ax)


def test_position_and_attention_explorers(image_trace):
    ex = widgets.PositionExplorer(image_trace)
    cells = image_trace.image_cells()[0][0]
    ex.token.value = int(cells[2, 5])
    pos = tuple(int(v) for v in image_trace.position_ids[:, cells[2, 5]])
    assert f"(t, h, w) = {pos}" in ex.figure.axes[0].get_title()
    assert "cell (row 2, col 5)" in ex.figure.axes[-1].get_title()
    att = widgets.AttentionExplorer(image_trace)
    att.layer.value, att.head.value = 2, 1
    assert np.array_equal(_image_data(att.figure.axes[0]), image_trace.full_attention(2)[1])
    att.head.value = None
    assert np.allclose(_image_data(att.figure.axes[0]), image_trace.full_attention(2).mean(0))


def test_explorers_set_their_output_without_capturing(trace, monkeypatch):
    """The figure goes into the Output widget's `outputs` from the kernel, never through `with out:` capture:
    capture makes nbclient (`jupyter execute`, nbmake) reply on the shell channel while it waits there for
    the cell's reply, and it then misses the reply until its timeout (for ever without one)."""
    import base64
    import io

    import ipywidgets
    from PIL import Image

    def no_capture(self):
        raise AssertionError("an explorer displayed through `with out:`")

    monkeypatch.setattr(ipywidgets.Output, "__enter__", no_capture)
    ex = widgets.GenerationExplorer(trace)
    ex.step.value = 2
    (shown,) = ex.out.outputs
    assert shown["output_type"] == "display_data"
    png = Image.open(io.BytesIO(base64.b64decode(shown["data"]["image/png"])))
    assert png.format == "PNG" and png.size[0] > 500
    assert ex.figure.get_suptitle().startswith("generation step 2")


def test_plots_work_in_a_plain_python_session(tmp_path):
    code = ("import sys, numpy as np; from qwen3vl_lab.viz import plot_attention; "
            "fig = plot_attention(np.eye(3), ['a', 'b', 'c']); fig.savefig(sys.argv[1]); "
            "print('ipywidgets' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- notebook helpers ------------------------------------------------------------------------------
def test_notebook_model_folder_choices(monkeypatch, tmp_path, tiny_dir):
    from qwen3vl_lab.apps import notebook

    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MODEL_DIR", raising=False)
    monkeypatch.delenv("HF_DIR", raising=False)
    tiny = notebook.tiny_model_dir()  # made on first use
    assert tiny.is_relative_to(tmp_path / "cache") and notebook.is_tiny() and notebook.model_dir() == tiny
    assert (tiny / "cpu-fp32" / "model.onnx").is_file() and (tiny / "cpu-int4" / "model.onnx").is_file()
    stamp = (tiny / "cpu-fp32" / "model.onnx").stat().st_mtime_ns
    assert notebook.tiny_model_dir() == tiny and (tiny / "cpu-fp32" / "model.onnx").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "cache").glob(".*")), "no temporary folders left behind"
    notebook.require_attentions(notebook.open_model())

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="MODEL_DIR .*does not exist"):
        notebook.model_dir()
    monkeypatch.setenv("MODEL_DIR", str(tiny))
    assert notebook.model_dir() == tiny and not notebook.is_tiny() and "MODEL_DIR" in notebook.describe()

    monkeypatch.delenv("MODEL_DIR")
    monkeypatch.setenv("HF_DIR", str(tmp_path))
    with pytest.raises(UserError, match="HF_DIR=.*config.json"):
        notebook.model_dir()
    monkeypatch.setenv("HF_DIR", str(tiny_dir))
    exported = notebook.model_dir()
    assert exported != tiny and exported.is_relative_to(tmp_path / "cache")
    assert "attentions.0" in load_model(exported).decoder_outputs and (exported / "cpu-int4").is_dir()
    assert notebook.model_dir() == exported  # exported once


def test_notebook_shapes_default(monkeypatch, tmp_path):
    """default="shapes": the trained shapes model, exported once with attentions, unless MODEL_DIR is set."""
    from qwen3vl_lab.apps import notebook
    from qwen3vl_lab.shapes import evaluate as shapes_eval
    from qwen3vl_lab.shapes import task as shapes

    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MODEL_DIR", raising=False)
    monkeypatch.delenv("HF_DIR", raising=False)
    folder = notebook.model_dir(default="shapes")
    assert folder == notebook.shapes_model_dir() and folder.is_relative_to(tmp_path / "cache")
    assert notebook.is_shapes() and "shapes" in notebook.describe(default="shapes")
    model = notebook.open_model(default="shapes")
    notebook.require_attentions(model)
    image, _ = shapes.make_scene([("red", "square", "top left")])
    assert shapes_eval.answer(model, image, "What colour is the square?") == "Red."  # trained, not random
    with pytest.raises(UserError, match="unknown default model"):
        notebook.model_dir(default="big")
    monkeypatch.setenv("MODEL_DIR", str(folder))
    assert notebook.model_dir(default="shapes") == folder and not notebook.is_shapes()
