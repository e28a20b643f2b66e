"""INT4 export: onnxruntime's MatMulNBitsQuantizer on the fp32 decoder, a self-contained cpu-int4 folder,
the recipe recorded and honoured in the graph, generation that works as fp32 does, and our MatMulNBits
unpacking checked against onnxruntime's own kernel."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import run_cli as run
from onnx import helper, numpy_helper

from qwen3vl_lab.debug.weights import QuantizedMatrix, dequantize_with_onnxruntime, read_quantized, unpack_bits
from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.exporter import export
from qwen3vl_lab.export.quantize import QUANTIZATION_FILE, Int4Recipe, quantize_matmul
from qwen3vl_lab.model import load_model
from qwen3vl_lab.pipeline import Qwen3VLTextOnlyPipeline

N_MATMULS = 4 * 7 + 1  # tiny: 4 layers x (q, k, v, o, gate, up, down) + lm_head

@pytest.fixture(scope="module")
def root(tiny_onnx_dir):
    return tiny_onnx_dir  # shared across test files: never modified in place


def graph(folder):
    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph


def attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# -- the folder ----------------------------------------------------------------------------------
def test_int4_folder_is_complete_and_records_its_recipe(root):
    f = root / "cpu-int4"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "qwen3vl_lab.json", QUANTIZATION_FILE,
                 "qwen3vl-embedding.onnx", "qwen3vl-embedding.onnx.data", "qwen3vl-embedding-genai.onnx",
                 "qwen3vl-vision.onnx", "tokenizer.json", "tokenizer_config.json"):
        assert (f / name).is_file(), name
    genai = {"qwen3vl_lab": json.loads((f / "qwen3vl_lab.json").read_text())}
    assert genai["qwen3vl_lab"]["precision"] == "int4"
    builder = {"block_size": 32, "symmetric": True, "accuracy_level": 4, "lm_head": "int4", "algorithm": "default",
               "bits": 4}
    assert {k: genai["qwen3vl_lab"]["recipe"][k] for k in builder} == builder
    q = json.loads((f / QUANTIZATION_FILE).read_text())
    assert q["recipe"] == genai["qwen3vl_lab"]["recipe"]
    assert q["num_quantized"] == N_MATMULS and len(q["nodes"]) == N_MATMULS
    assert q["decoder_bytes"]["quantized"] < q["decoder_bytes"]["fp32"] / 5
    # the graph really holds what the record says: every weight MatMul became MatMulNBits {4, 32, 4}
    g = graph(f)
    inits = {t.name for t in g.initializer}
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == N_MATMULS
    assert not [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert {(attrs(n)["bits"], attrs(n)["block_size"], attrs(n)["accuracy_level"]) for n in nbits} == {(4, 32, 4)}
    assert all(len(n.input) == 3 for n in nbits)  # symmetric: no zero points
    # embedding/vision are the fp32 files, hard-linked (tests/test_shared_files.py); the graph loads without them
    assert (f / "qwen3vl-embedding.onnx.data").read_bytes() == (root / "cpu-fp32/qwen3vl-embedding.onnx.data").read_bytes()
    assert onnx.load(str(f / "qwen3vl-embedding.onnx"), load_external_data=False).graph.initializer


def test_int4_only_export_writes_no_fp32_folder(tiny_dir, tmp_path):
    out = export(tiny_dir, tmp_path / "o", ["int4"], progress=False, log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["cpu-int4", "pytorch"]


def test_generate_with_int4_works_as_fp32_does(root, capsys):
    results = {}
    for precision in ("fp32", "int4"):
        code, out, err = run(capsys, "generate", "--model_dir", str(root), "--text_precision", precision,
                             "--prompt", "Hello", "--max_new_tokens", "5", "--temperature", "0", "--json")
        assert code == 0, err
        results[precision] = json.loads(out.strip().splitlines()[-1])
    assert results["fp32"].keys() == results["int4"].keys()
    assert len(results["int4"]["token_ids"]) == 5
    pipe = Qwen3VLTextOnlyPipeline(root, "int4")
    assert pipe.model.precision == "int4"
    assert pipe.generate_result("Hello", max_new_tokens=5, temperature=0.0).token_ids == results["int4"]["token_ids"]


# -- options -------------------------------------------------------------------------------------
def test_cli_options_reach_the_graph(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(capsys, "export", "--hf_dir", str(tiny_dir), "--output_dir", str(out), "--precision", "int4",
                       "--block_size", "32", "--asymmetric", "--accuracy_level", "0", "--lm_head", "int8",
                       "--algorithm", "rtn", "--quiet")
    assert code == 0, err
    f = out / "cpu-int4"
    recipe = json.loads((f / "qwen3vl_lab.json").read_text())["recipe"]
    assert recipe["name"] == "rtn-b32-asym-acc0-head_int8"
    g = graph(f)
    head = next(n for n in g.node if "logits" in n.output)
    body = [n for n in g.node if n.op_type == "MatMulNBits" and n is not head]
    assert head.op_type == "MatMulNBits" and attrs(head)["bits"] == 8
    assert {attrs(n)["block_size"] for n in body} == {32} and {attrs(n)["bits"] for n in body} == {4}
    assert all(len(n.input) == 4 for n in body)  # asymmetric: zero points
    assert all("accuracy_level" not in attrs(n) for n in body)  # level 0 = unset
    model = load_model(out, "int4")  # and it runs
    assert model.decoder is not None


def test_fp32_lm_head_stays_a_matmul(root, tmp_path):
    from qwen3vl_lab.export.quantize import quantize_folder

    f = quantize_folder(root / "cpu-fp32", tmp_path / "v", Int4Recipe(lm_head="fp32", accuracy_level=1), progress=False)
    g = graph(f)
    head = next(n for n in g.node if "logits" in n.output)
    assert head.op_type == "MatMul"
    assert {attrs(n)["accuracy_level"] for n in g.node if n.op_type == "MatMulNBits"} == {1}
    assert json.loads((f / QUANTIZATION_FILE).read_text())["excluded"] == [head.name]


def test_bad_options_are_one_line_errors_and_write_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code, _, err = run(capsys, "export", "--hf_dir", str(tiny_dir), "--output_dir", str(out), "--block_size", "64")
    assert code == 2 and "--precision int4" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    code, _, err = run(capsys, "export", "--hf_dir", str(tiny_dir), "--output_dir", str(out), "--precision", "int4",
                       "--block_size", "48")
    assert code == 2 and not out.exists()
    with pytest.raises(UserError, match="block_size"):
        Int4Recipe(block_size=48).validate()
    with pytest.raises(UserError, match="2-bit"):
        Int4Recipe(bits=2, algorithm="rtn").validate()
    assert Int4Recipe(algorithm="k_quant").validate().symmetric is False  # k_quant always writes zero points
    for r in (Int4Recipe(), Int4Recipe(bits=2), Int4Recipe(block_size=128, symmetric=False, accuracy_level=0,
                                                             lm_head="fp32", algorithm="rtn")):
        assert Int4Recipe.from_name(r.name) == r


# -- the dequantizer -----------------------------------------------------------------------------
def test_unpack_bits_by_hand():
    assert unpack_bits(np.array([0x21], np.uint8), 4).tolist() == [1, 2]  # low nibble first
    assert unpack_bits(np.array([0b11100100], np.uint8), 2).tolist() == [0, 1, 2, 3]
    assert unpack_bits(np.array([7, 250], np.uint8), 8).tolist() == [7, 250]


def _one_matrix(recipe: Int4Recipe, bits: int, k: int = 96, n: int = 40) -> tuple[np.ndarray, QuantizedMatrix]:
    """Quantize a random (K, N) weight through our quantizer driver and read it back as a QuantizedMatrix."""
    w = np.random.default_rng(bits + recipe.block_size).standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/mm/MatMul")
    nodes, inits = quantize_matmul(node, w, recipe.validate(), bits)
    q = next(x for x in nodes if x.op_type == "MatMulNBits")
    t = {i.name: numpy_helper.to_array(i) for i in inits}
    a = attrs(q)
    nb = (k + a["block_size"] - 1) // a["block_size"]
    zp = t[q.input[3]] if len(q.input) > 3 else None
    return w, QuantizedMatrix(q.name, q.output[0], q.input[1], a["K"], a["N"], a["bits"], a["block_size"],
                              a.get("accuracy_level", 0), t[q.input[1]].reshape(n, nb, -1),
                              t[q.input[2]].astype(np.float32).reshape(n, nb), zp)


@pytest.mark.parametrize("recipe,bits,max_rel", [
    (Int4Recipe(block_size=64), 4, 0.2),  # symmetric int4, K=96 is padded to 2 blocks of 64
    (Int4Recipe(block_size=256, symmetric=False), 4, 0.2),  # one padded block, uint4 + zero points
    (Int4Recipe(bits=2), 2, 0.6),
    (Int4Recipe(lm_head="int8"), 8, 0.02),
    (Int4Recipe(algorithm="rtn", symmetric=False, block_size=16), 4, 0.2),  # 6 blocks per column
    (Int4Recipe(algorithm="k_quant", block_size=16), 4, 0.2),
    (Int4Recipe(algorithm="hqq"), 4, 0.2),  # float zero points
])
def test_dequantizer_matches_onnxruntime_kernel(recipe, bits, max_rel):
    if recipe.algorithm == "hqq":
        pytest.importorskip("torch")
    w, qm = _one_matrix(recipe, bits)
    ours = qm.dequantize()  # (K, N)
    theirs = dequantize_with_onnxruntime(qm)  # onnxruntime: identity @ W
    assert ours.shape == theirs.shape == w.shape
    assert np.abs(ours - theirs).max() <= 1e-6 * max(1.0, np.abs(theirs).max())
    rel = np.linalg.norm(ours - w) / np.linalg.norm(w)
    assert 0 < rel < max_rel  # a real quantization error, of the size the bit width allows


def test_dequantizer_on_the_exported_folder(root):
    mats = read_quantized(root / "cpu-int4")
    assert len(mats) == N_MATMULS
    for qm in mats:
        sub = qm if qm.N <= 512 else qm.columns(np.arange(0, qm.N, 97))  # the 151936-wide head: a column sample
        np.testing.assert_allclose(sub.dequantize(), dequantize_with_onnxruntime(sub), rtol=0, atol=1e-6)


def test_rtn_zero_points_with_an_odd_block_count_are_a_user_error():
    # onnxruntime 1.32's rtn/k_quant path packs zero points across columns when K / block is odd and crashes
    for recipe in (Int4Recipe(algorithm="rtn", symmetric=False), Int4Recipe(algorithm="k_quant")):
        with pytest.raises(UserError, match="odd number"):
            _one_matrix(recipe, 4)  # K=96, block 32: 3 blocks
