"""Answers, not logits: the simulated low-bit rounding (debug/simulate.py) and the per-recipe shapes
accuracy (debug/accuracy.py, `eval-shapes --recipes`, `sweep --shapes`).

The simulation is checked against onnxruntime itself: at 2 and 4 bits its rounded weights equal what
onnxruntime's own MatMulNBits kernel multiplies by after onnxruntime's own quantizer (bit for bit),
and a simulated INT4 folder generates what the real MatMulNBits folder generates. 3 bits and per-tensor
scales, which MatMulNBits cannot run, are checked against a plain per-element reference written here.
Accuracy assertions are qualitative (a checkpoint may be retrained): INT4 stays near fp32, 2-bit with
one asymmetric scale per matrix falls far below it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli
from onnx import helper, numpy_helper

from qwen3vl_lab.debug.compare import teacher_forced
from qwen3vl_lab.debug.simulate import SIMULATION_FILE, SimRecipe, fake_quantize, simulate_folder
from qwen3vl_lab.debug.variants import VARIANT_STAMP
from qwen3vl_lab.debug.weights import QuantizedMatrix, dequantize_with_onnxruntime
from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.quantize import Int4Recipe, quantize_folder, quantize_matmul
from qwen3vl_lab.model import load_model
from qwen3vl_lab.shapes.accuracy import load_variant, parse_recipe, recipe_accuracy, source_fingerprint

PER_TENSOR_2BIT_ASYM = SimRecipe(bits=2, block_size=None, symmetric=False)


def weights(k: int = 200, n: int = 24, seed: int = 0) -> np.ndarray:
    """(K, N) float32 with column scales from 0.01 to 2 and one outlier; K is not a multiple of any block."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2.0, (1, n))).astype(np.float32)
    w[3, 5] = 9.0
    return w


def onnxruntime_weights(w: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """onnxruntime's quantizer packs W into MatMulNBits; onnxruntime's kernel multiplies the identity by it."""
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    recipe = Int4Recipe(bits=bits, block_size=block_size, symmetric=symmetric, accuracy_level=0)
    nodes, inits = quantize_matmul(node, w, recipe, bits)
    q = next(n for n in nodes if n.op_type == "MatMulNBits")
    arrays = {t.name: numpy_helper.to_array(t) for t in inits}
    zp = arrays[q.input[3]] if len(q.input) > 3 and q.input[3] else None
    k, n = w.shape
    nb = (k + block_size - 1) // block_size
    packed, scales = arrays[q.input[1]].reshape(n, nb, -1), arrays[q.input[2]].reshape(n, nb).astype(np.float32)
    qm = QuantizedMatrix(q.name, q.output[0], q.input[1], k, n, bits, block_size, 0, packed, scales, zp)
    return dequantize_with_onnxruntime(qm)


# -- the rounding ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_simulated_rounding_equals_onnxruntime_matmulnbits(bits, symmetric, block_size):
    w = weights()
    real = onnxruntime_weights(w, bits, block_size, symmetric)
    sim = fake_quantize(w, bits, block_size, symmetric)
    assert np.array_equal(sim, real), np.abs(sim - real).max()
    assert not np.array_equal(sim, w)  # it did round


def reference_rounding(w: np.ndarray, bits: int, block_size: int | None, symmetric: bool) -> np.ndarray:
    """One block at a time, one element at a time: the rule as written in simulate.py's docstring."""
    k, n = w.shape
    out = np.zeros_like(w)
    top = 2 ** bits - 1
    groups = [[(r, c) for c in range(n) for r in range(k)]] if block_size is None else \
        [[(r, c) for r in range(b, min(b + block_size, k))] for c in range(n) for b in range(0, k, block_size)]
    for cells in groups:
        values = [float(w[r, c]) for r, c in cells]
        if symmetric:
            m = max(values, key=abs)
            scale, zp = -m / 2 ** (bits - 1), 2 ** (bits - 1)
        else:
            lo, hi = min(min(values), 0.0), max(max(values), 0.0)
            scale = (hi - lo) / top
            zp = min(max(round(-lo / scale), 0), top) if scale else 0
        for (r, c), v in zip(cells, values):
            q = min(max(np.floor(v / scale + zp + 0.5), 0), top) if scale else zp
            out[r, c] = (q - zp) * scale
    return out


@pytest.mark.parametrize("bits,block_size,symmetric", [(3, 32, True), (3, 16, False), (3, None, True),
                                                       (3, None, False), (2, None, True), (4, None, False)])
def test_three_bit_and_per_tensor_rounding_follow_the_plain_rule(bits, block_size, symmetric):
    w = weights(k=40, n=6)
    sim = fake_quantize(w, bits, block_size, symmetric)
    ref = reference_rounding(w, bits, block_size, symmetric)
    assert np.allclose(sim, ref, rtol=1e-5, atol=1e-6), np.abs(sim - ref).max()
    levels = [np.unique(sim)] if block_size is None else [np.unique(sim[b:b + block_size, c])
                                                          for c in range(w.shape[1]) for b in range(0, 40, block_size)]
    assert max(len(v) for v in levels) <= 2 ** bits  # one grid per block (per matrix) of 2^bits values


def test_clipping_search_never_increases_a_blocks_error():
    w = weights()
    for block in (32, None):
        plain, clipped = fake_quantize(w, 2, block), fake_quantize(w, 2, block, clip=True)
        blocks = [(slice(None), slice(None))] if block is None else \
            [(slice(b, b + block), c) for c in range(w.shape[1]) for b in range(0, w.shape[0], block)]
        for sl in blocks:
            assert ((clipped[sl] - w[sl]) ** 2).sum() <= ((plain[sl] - w[sl]) ** 2).sum() * (1 + 1e-6)
        assert ((clipped - w) ** 2).sum() < 0.9 * ((plain - w) ** 2).sum()  # the outlier makes clipping pay


def test_recipe_names_round_trip_and_bad_ones_are_one_line_errors():
    for recipe in (SimRecipe(), SimRecipe(bits=2, block_size=16, symmetric=False, clip=True),
                   SimRecipe(bits=4, block_size=128, lm_head="fp32")):
        assert recipe.name.startswith("sim-") and SimRecipe.from_name(recipe.name) == recipe
    assert SimRecipe(bits=3, block_size=None).name == "sim-int3-per-tensor"
    assert parse_recipe("fp32") == "fp32"
    assert parse_recipe("sim-int2-b16-asym-mse") == SimRecipe(bits=2, block_size=16, symmetric=False, clip=True)
    assert parse_recipe("default-2bit-b16-asym-acc4-head_int4") == Int4Recipe(bits=2, block_size=16, symmetric=False)
    for bad, needle in (("int4", "recipe name"), ("sim-int7-b32", "bits 7"), ("sim-int3-b48", "block size 48"),
                        ("sim-int3", "sim-intBITS")):
        with pytest.raises(UserError, match=needle) as e:
            parse_recipe(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="simulated bits"):
        fake_quantize(weights(), 7)


# -- simulated folders ---------------------------------------------------------------------------
def test_simulated_int4_folder_generates_like_the_real_matmulnbits_folder(tiny_onnx_fp32_dir, tmp_path):
    fp32 = tiny_onnx_fp32_dir / "cpu-fp32"
    real = load_model(quantize_folder(fp32, tmp_path / "real", Int4Recipe(accuracy_level=0), progress=False))
    sim_folder = simulate_folder(fp32, tmp_path / "sim", SimRecipe(bits=4, block_size=32))
    broken_folder = simulate_folder(fp32, tmp_path / "sim2", PER_TENSOR_2BIT_ASYM)
    sim, broken = load_model(sim_folder), load_model(broken_folder)
    same = teacher_forced(real, sim, "Write a haiku about the sea.", n_steps=8)
    assert same.agreement == 1.0 and same.kl.max() < 1e-4, same.kl.max()  # same weights, two kernels
    far = teacher_forced(real, broken, "Write a haiku about the sea.", n_steps=8)
    assert far.mean_kl > 100 * max(same.mean_kl, 1e-9)
    genai = json.loads((sim_folder / "genai_config.json").read_text())["qwen3vl_lab"]
    assert genai["precision"] == "fp32" and genai["simulation"]["name"] == "sim-int4-b32"
    record = json.loads((sim_folder / SIMULATION_FILE).read_text())
    assert "SIMULATION" in record["what"] and len(record["matrices"]) == len(
        json.loads((real.folder / "quantization.json").read_text())["nodes"])
    with pytest.raises(UserError, match="plain fp32 folder"):  # a simulation is not simulated again
        simulate_folder(sim_folder, tmp_path / "again", SimRecipe())


# -- accuracy on the shapes task -------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored(shapes_onnx_fp32_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    recipes = ["fp32", Int4Recipe(), PER_TENSOR_2BIT_ASYM]
    return recipe_accuracy(shapes_onnx_fp32_dir, recipes, n=2, out_dir=out, progress=False), out, recipes


def test_int4_keeps_the_answers_and_per_tensor_two_bit_breaks_them(scored):
    result, out, _ = scored
    assert result.names == ["fp32", "default-b32-sym-acc4-head_int4", "sim-int2-per-tensor-asym"]
    assert len(result.questions) == 4 + 7  # one one-object and one two-object scene, every question
    fp32, int4, bad = (result.row(r) for r in result.names)
    assert fp32.accuracy() >= 0.5 and int4.accuracy() >= fp32.accuracy() - 0.1
    assert result.same_as(int4.recipe) >= 0.8
    assert bad.accuracy() <= int4.accuracy() - 0.3 and bad.well_formed < int4.well_formed
    assert [r.kind for r in result.rows] == ["fp32", "onnxruntime", "SIMULATED"]
    table = result.table()
    assert "sim-int2-per-tensor-asym               SIMULATED" in table and "SIMULATED: fp32 MatMuls" in table
    examples = result.examples_table()
    assert all(name in examples for name in result.names) and examples.count("Q: ") == 4
    saved = json.loads(json.dumps(result.to_json()))
    assert [r["simulated"] for r in saved["rows"]] == [False, False, True]
    for name in result.names[1:]:  # each variant is its own export root: the checkpoint's preprocessor comes along
        assert (out / name / "pytorch" / "preprocessor_config.json").is_file()


def test_variants_are_reused_and_rebuilt_when_the_weights_change(scored, shapes_onnx_fp32_dir):
    _, out, recipes = scored
    again = recipe_accuracy(shapes_onnx_fp32_dir, recipes[1:2], n=1, out_dir=out, progress=False)
    assert again.names == ["fp32", recipes[1].name] and again.rows[1].reused
    stamp_path = out / recipes[1].name / VARIANT_STAMP
    stamp = json.loads(stamp_path.read_text())
    assert stamp["source_sha256"] == source_fingerprint(shapes_onnx_fp32_dir / "cpu-fp32")
    stamp_path.write_text(json.dumps({**stamp, "source_sha256": "an older checkpoint"}))
    model = load_variant(shapes_onnx_fp32_dir, recipes[1], out)
    assert json.loads(stamp_path.read_text())["source_sha256"] == stamp["source_sha256"]  # rebuilt
    assert model.folder == out / recipes[1].name


def test_a_model_that_is_not_the_shapes_model_is_refused(tiny_onnx_fp32_dir):
    with pytest.raises(UserError, match="not the trained shapes model") as e:
        recipe_accuracy(tiny_onnx_fp32_dir, ["fp32"], n=1, progress=False)
    assert "make-tiny --trained" in str(e.value)


def test_plot_recipe_accuracy(scored):
    from qwen3vl_lab.viz.int4 import plot_recipe_accuracy

    result = scored[0]
    fig = plot_recipe_accuracy(result)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [r.label for r in result.rows] and labels[2].endswith("SIMULATED")
    hatched = [p.get_hatch() for p in ax.patches]
    assert hatched == [None, None, "///"]  # only the simulated bar is hatched
    widths = [p.get_width() for p in ax.patches]
    assert np.allclose(widths, result.accuracy())
    fig2 = plot_recipe_accuracy([0.9, 0.2], labels=["fp32", "sim-int2-per-tensor"], simulated=[False, True])
    assert fig2.axes[0].get_yticklabels()[1].get_text().endswith("SIMULATED")
    with pytest.raises(UserError, match="one label per accuracy"):
        plot_recipe_accuracy([0.9, 0.2], labels=["fp32"])


# -- command line ----------------------------------------------------------------------------------
def test_eval_shapes_recipes_cli(shapes_onnx_fp32_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval-shapes", "--model_dir", shapes_onnx_fp32_dir, "--recipes", "fp32",
                             "sim-int3-per-tensor", "--n", 1, "--out_dir", tmp_path / "v", "--quiet", "--json")
    assert code == 0, err
    saved = json.loads(out.strip().splitlines()[-1])
    assert [r["recipe"] for r in saved["rows"]] == ["fp32", "sim-int3-per-tensor"] and saved["rows"][1]["simulated"]
    assert "SIMULATED" in out and "Q: " in out
    assert (tmp_path / "v" / "sim-int3-per-tensor" / VARIANT_STAMP).is_file()


@pytest.mark.parametrize("argv,needle", [
    (["--recipes", "int4"], "recipe name 'int4'"),
    (["--recipes", "sim-int7-b32"], "bits 7"),
    (["--recipes", "fp32", "--text_precision", "int4"], "leave out --text_precision"),
    (["--out_dir", "somewhere"], "--out_dir keeps the variants"),
])
def test_eval_shapes_recipes_bad_input_is_one_line(shapes_onnx_fp32_dir, capsys, argv, needle):
    code, _, err = run_cli(capsys, "eval-shapes", "--model_dir", shapes_onnx_fp32_dir, *argv)
    assert_one_line_error(code, err, needle)


def test_sweep_with_shapes_accuracy_and_a_simulated_recipe(shapes_onnx_fp32_dir, tmp_path, capsys):
    from qwen3vl_lab.shapes import task as shapes

    shapes.make_scene(3)[0].save(tmp_path / "scene.png")  # variants carry the checkpoint's preprocessor: same tokens
    names = ["sim-int2-per-tensor-asym", "default-b32-sym-acc4-head_int4"]
    code, out, err = run_cli(capsys, "sweep", "--model_dir", shapes_onnx_fp32_dir, "--recipes", *names,
                             "--prompt", "What is in the image?", "--image", tmp_path / "scene.png", "--n_steps", 2,
                             "--shapes", 1, "--out_dir", tmp_path / "v", "--quiet")
    assert code == 0, err
    assert "recipe sweep: 2 prompt(s)" in out  # the text prompt, and with the image
    sweep_table, accuracy_table = out.split("shapes accuracy:")
    ranked = [ln for ln in sweep_table.splitlines() if ln[:2].strip().isdigit()]
    assert names[1] in ranked[0] and names[0] in ranked[1] and ranked[1].endswith("SIMULATED")
    assert all(name in accuracy_table for name in ["fp32", *names])
    code, _, err = run_cli(capsys, "sweep", "--model_dir", shapes_onnx_fp32_dir, "--recipes", "fp32")
    assert_one_line_error(code, err, "fp32 is the sweep's reference")
    code, _, err = run_cli(capsys, "sweep", "--model_dir", shapes_onnx_fp32_dir, "--shapes", 0)
    assert_one_line_error(code, err, "--shapes")


def test_sweep_shapes_refuses_another_model_before_building_anything(tiny_onnx_fp32_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sweep", "--model_dir", tiny_onnx_fp32_dir, "--recipes",
                           "default-b32-sym-acc4-head_int4", "--shapes", 1, "--out_dir", tmp_path / "v", "--quiet")
    assert_one_line_error(code, err, "not the trained shapes model")
    assert not (tmp_path / "v" / "default-b32-sym-acc4-head_int4").exists()


def test_shared_assets_follow_the_export(tmp_path):
    from qwen3vl_lab.debug.variants import _sync_file

    src, dst = tmp_path / "a.onnx.data", tmp_path / "assets" / "a.onnx.data"
    dst.parent.mkdir()
    src.write_bytes(b"old weights")
    _sync_file(src, dst)
    inode = dst.stat().st_ino
    _sync_file(src, dst)
    assert dst.stat().st_ino == inode  # unchanged: not copied again
    src.write_bytes(b"new weights!")
    _sync_file(src, dst)
    assert dst.read_bytes() == b"new weights!" and dst.stat().st_ino != inode  # variants linked to the old copy keep it
