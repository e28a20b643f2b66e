"""Notebooks 04-07's exercises: every check passes the reference solution and catches a wrong one, naming the mistake.

The checks' oracles are independent of the reference solutions (onnxruntime's MatMulNBits kernel, the pixels
of an image, patterns with known scores, KL written out with math), so a reference that passes is evidence,
not a tautology; a wrong solution must raise `Mismatch` with a hint that names the mistake.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_lab.apps.lessons import attention, doctor_export, int4, vision
from qwen3vl_lab.apps.lessons.grading import Mismatch
from qwen3vl_lab.errors import UserError


def _not_written(*_):
    raise NotImplementedError


# -- 05: dequantize one block ----------------------------------------------------------------------
def _high_nibble_first(packed, scale, zero_point):
    p = np.asarray(packed, np.uint8)
    q = np.stack([p >> 4, p & 0x0F], axis=1).reshape(-1).astype(np.float32)
    return (q - zero_point) * scale


def _no_zero_point(packed, scale, zero_point):
    p = np.asarray(packed, np.uint8)
    return np.stack([p & 0x0F, p >> 4], axis=1).reshape(-1).astype(np.float32) * scale


# -- 04: patch rows --------------------------------------------------------------------------------
def _reading_order(r, c, grid_w):
    return r * grid_w + c


def _column_major_inside(r, c, grid_w):
    return ((r // 2) * (grid_w // 2) + c // 2) * 4 + (c % 2) * 2 + r % 2


# -- 06: head detectors ----------------------------------------------------------------------------
def _previous_with_query0(attn):
    return np.diagonal(attn, -1, 1, 2).sum(-1) / attn.shape[-1]


def _sink_transposed(attn):
    return attn[:, 0, 1:].mean(-1)


# -- 07: KL per step -------------------------------------------------------------------------------
def _kl_swapped(ref, test):
    return doctor_export.kl_per_step(test, ref)


def _kl_naive(ref, test):
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
        q = np.exp(test) / np.exp(test).sum(-1, keepdims=True)
        return (p * np.log(p / q)).sum(-1)


EXERCISES = [  # (check, reference solution, [(wrong solution, words its hint must contain)])
    (int4.check_dequantize_block, int4.dequantize_block,
     [(_high_nibble_first, "LOW nibble"), (_no_zero_point, "subtract the zero point")]),
    (vision.check_patch_row, vision.patch_row,
     [(_reading_order, "block by block"), (_column_major_inside, "top-left, top-right")]),
    (attention.check_previous_token_score, attention.previous_token_score, [(_previous_with_query0, "query 0")]),
    (attention.check_sink_score, attention.sink_score, [(_sink_transposed, "column 0")]),
    (doctor_export.check_kl_per_step, doctor_export.kl_per_step,
     [(_kl_swapped, "swapped"), (_kl_naive, "overflows")]),
]
IDS = [check.__name__ for check, _, _ in EXERCISES]


@pytest.mark.parametrize(("check", "solution", "wrong"), EXERCISES, ids=IDS)
def test_check_passes_the_reference_solution(check, solution, wrong, capsys):
    assert check(solution) is True
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize(("check", "solution", "wrong"), EXERCISES, ids=IDS)
def test_check_catches_a_wrong_solution_and_names_the_mistake(check, solution, wrong):
    for fn, words in wrong:
        with pytest.raises(Mismatch) as caught:
            check(fn)
        message = str(caught.value)
        assert "hint:" in message and words in message, message
        assert "your function gives" in message and "the reference" in message


@pytest.mark.parametrize(("check", "solution", "wrong"), EXERCISES, ids=IDS)
def test_an_unwritten_exercise_is_reported_not_failed(check, solution, wrong, capsys):
    assert check(_not_written) is False
    assert "not written yet" in capsys.readouterr().out


def test_the_block_oracle_is_onnxruntime_not_the_solution():
    """The reference dequantization agrees with onnxruntime's kernel on a block neither was written for."""
    packed = np.arange(16, dtype=np.uint8) * 17  # byte j = (j, j): codes 0, 0, 1, 1, ..., 15, 15
    got = int4.onnxruntime_block(packed, 0.5, 8)
    assert np.array_equal(got, (np.repeat(np.arange(16), 2) - 8) * 0.5)
    assert np.array_equal(int4.dequantize_block(packed, 0.5, 8), got)


def test_image_token_of_a_patch():
    """A 6 x 6 patch grid (a 96 x 96 scene) has 3 x 3 image tokens: patch (3, 4) is in token (1, 2) = 5."""
    assert vision.image_token(3, 4, 6) == 5 and vision.image_token(0, 1, 6) == 0 and vision.image_token(5, 5, 6) == 8


# -- 07 after the plain install ------------------------------------------------------------------------
BLOCKER = '''"""Test-only: make these modules unimportable, as after `pip install -e .` without extras."""
import sys
for name in ("torch", "onnxruntime_genai"):
    sys.modules[name] = None  # `import torch` raises ImportError; importlib.util.find_spec returns None
'''


@pytest.mark.slow
def test_notebook_07_runs_without_torch_and_onnxruntime_genai(tmp_path):
    """Notebook 07 top to bottom in a kernel where `import torch` and `import onnxruntime_genai` fail: the plain
    install's path (our fp32 + INT4 export of the shapes model) asserts what it teaches and passes."""
    nbclient = pytest.importorskip("nbclient")
    import os
    from pathlib import Path

    import nbformat

    root = Path(__file__).resolve().parents[1]
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(root), os.environ.get("PYTHONPATH", "")]),
           "QWEN3VL_LAB_CACHE": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    for name in ("MODEL_DIR", "HF_DIR"):
        env.pop(name, None)
    nb = nbformat.read(root / "notebooks" / "07_doctor_your_export.ipynb", as_version=4)
    probe = nbformat.v4.new_code_cell("import importlib.util, sys\n"
                                      "print('blocked:', [m for m in ('torch', 'onnxruntime_genai') "
                                      "if importlib.util.find_spec(m) is None], sorted(m for m in sys.modules "
                                      "if m.split('.')[0] in ('torch', 'onnxruntime_genai') and sys.modules[m]))")
    nb.cells.append(probe)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # passed to jupyter_client's start_kernel
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "our own fp32 + INT4 export" in text, "without the extra, 07 doctors our export"
    assert "07_doctor_your_export: all checks passed" in text
    assert "blocked: ['torch', 'onnxruntime_genai'] []" in text, "the kernel could import neither, and did not"


# -- the figures the lessons added ---------------------------------------------------------------------
def test_int4_block_figure_draws_the_weights_their_levels_and_the_error():
    from qwen3vl_lab.viz.int4 import plot_int4_block

    w = np.random.default_rng(0).normal(size=32).astype(np.float32)
    scale = -w[np.abs(w).argmax()] / 8  # symmetric round-to-nearest: the largest weight is code 0
    codes = np.clip(np.floor(w / scale + 8 + 0.5), 0, 15)
    rounded = (codes - 8) * scale
    fig = plot_int4_block(w, rounded, float(scale), 8)
    top, bottom = fig.axes
    levels = sorted(float(np.asarray(ln.get_ydata())[0]) for ln in top.get_lines() if len(ln.get_ydata()) == 2)
    assert np.allclose(levels, sorted((np.arange(16) - 8) * scale))  # the 16 grey levels of the grid
    assert np.allclose(top.get_lines()[-2].get_ydata(), w) and np.allclose(top.get_lines()[-1].get_ydata(), rounded)
    assert np.allclose([p.get_height() for p in bottom.patches], w - rounded)
    with pytest.raises(UserError, match="same block"):
        plot_int4_block(w, rounded[:16], float(scale), 8)


def test_deepstack_diagram_names_each_tapped_block_and_the_layer_it_joins():
    from qwen3vl_lab.viz.pieces import plot_deepstack

    fig = plot_deepstack(24, (5, 11, 17), 28)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert {"vision block 5", "vision block 11", "vision block 17", "decoder layer 27"} <= set(texts)
    assert [t for t in texts if t.startswith("+ after layer")] == ["+ after layer 0", "+ after layer 1", "+ after layer 2"]
    with pytest.raises(UserError, match="vision blocks"):
        plot_deepstack(2, (0, 5), 4)


def test_recipe_accuracy_bars_carry_their_wilson_interval():
    from types import SimpleNamespace

    from qwen3vl_lab.stats import wilson_interval
    from qwen3vl_lab.viz.int4 import plot_recipe_accuracy

    rows = [SimpleNamespace(label=name, simulated=False, bits=b, kind=k, table={"all": {"correct": c, "total": 30}})
            for name, b, k, c in (("fp32", 32, "fp32", 27), ("int2", 2, "onnxruntime", 9))]
    result = SimpleNamespace(rows=rows, accuracy=lambda key: np.array([0.9, 0.3]), well_formed=[1.0, 0.5])
    ax = plot_recipe_accuracy(result).axes[0]
    (bars,) = [c for c in ax.collections if c.get_segments() and len(c.get_segments()) == 2]
    spans = sorted(tuple(np.round(sorted(s[:, 0]), 6)) for s in bars.get_segments())
    want = sorted(tuple(np.round(wilson_interval(c, 30), 6)) for c in (27, 9))
    assert spans == want
