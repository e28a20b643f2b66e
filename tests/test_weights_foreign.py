"""Weight by weight on an INT4 decoder made by another tool: the original guide's (onnxruntime-genai's builder).

- Every MatMulNBits maps to the checkpoint's tensors: the fused qkv_proj to q_proj, k_proj, v_proj; the
  lm_head to the tied embedding (the tiny checkpoint has no lm_head.weight).
- `compare_weights` against the checkpoint gives the errors of 4-bit RTN (block 32) on random weights,
  and the same errors as against the builder's own fp32 graph (whose MatMuls write the same tensors);
  a wrong pairing (k against v, q and k swapped) gives an error ten times larger.
- A checkpoint of other sizes is refused in one line.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from qwen3vl_lab.debug.checkpoint_weights import CheckpointWeights, checkpoint_sources
from qwen3vl_lab.debug.weights import compare_weights, dequantize_with_onnxruntime, matrix_error, read_quantized
from qwen3vl_lab.errors import UserError
from qwen3vl_lab.model import load_model

VL = "model.language_model."
RTN_BOUND = 0.12  # measured 0.093-0.097 on the tiny checkpoint (4-bit symmetric RTN, block 32, Gaussian weights)
WRONG_BOUND = 0.8  # two independent random matrices: ~sqrt(2); measured 1.22-1.44


@pytest.fixture(scope="module")
def guide_int4(guide_export_dir):
    return load_model(guide_export_dir, "int4")


def test_every_matmulnbits_maps_to_checkpoint_tensors(guide_int4, guide_export_dir):
    graph = onnx.load(str(guide_int4.decoder_file), load_external_data=False).graph
    nodes = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
    sources = checkpoint_sources(guide_int4)  # the checkpoint shipped in pytorch/
    assert [s.node for s in sources] == nodes
    L = guide_int4.config.text.num_hidden_layers
    assert len(nodes) == 5 * L + 1  # qkv, o, gate, up, down per layer, and the head
    by_node = {s.node: s for s in sources}
    for i in range(L):
        prefix = f"{VL}layers.{i}."
        assert by_node[f"/model/layers.{i}/attn/qkv_proj/MatMul_Q4"].keys == tuple(
            f"{prefix}self_attn.{p}_proj.weight" for p in "qkv")
        assert by_node[f"/model/layers.{i}/attn/o_proj/MatMul_Q4"].keys == (f"{prefix}self_attn.o_proj.weight",)
        for p in ("gate", "up", "down"):
            assert by_node[f"/model/layers.{i}/mlp/{p}_proj/MatMul_Q4"].keys == (f"{prefix}mlp.{p}_proj.weight",)
    head = by_node["/lm_head/MatMul_Q4"]
    assert "lm_head.weight" not in CheckpointWeights(guide_export_dir / "pytorch").ckpt  # tied: not stored
    assert head.keys == (f"{VL}embed_tokens.weight",) and head.tied


def test_compare_weights_against_the_checkpoint(guide_int4, guide_export_dir, tiny_onnx_fp32_dir):
    vs_checkpoint = compare_weights(None, guide_int4)
    assert len(vs_checkpoint.rows) == 5 * guide_int4.config.text.num_hidden_layers + 1
    assert np.all(vs_checkpoint.rel_error < RTN_BOUND) and np.all(vs_checkpoint.rel_error > 0.05)
    # the builder's own fp32 graph: its MatMuls write the same tensors, so no checkpoint is read
    vs_fp32 = compare_weights(guide_export_dir, guide_int4)
    np.testing.assert_allclose(vs_checkpoint.rel_error, vs_fp32.rel_error, rtol=1e-6)
    # our fp32 export writes other tensors: compare_weights falls back to the checkpoint shipped with the guide's
    vs_ours = compare_weights(tiny_onnx_fp32_dir, guide_int4)
    np.testing.assert_allclose(vs_ours.rel_error, vs_checkpoint.rel_error, rtol=1e-6)


def test_a_wrong_pairing_gives_a_large_error(guide_int4, guide_export_dir):
    ckpt = CheckpointWeights(guide_export_dir / "pytorch").ckpt
    q, k, v = (ckpt.get(f"{VL}layers.0.self_attn.{p}_proj.weight") for p in "qkv")  # each (out, in)
    qkv = read_quantized(guide_int4, names={"model.layers.0.attn.qkv_proj.MatMul"})[0]
    np.testing.assert_allclose(qkv.dequantize(), dequantize_with_onnxruntime(qkv), atol=1e-6)  # our unpacking = ORT's
    nq, nk = q.shape[0], k.shape[0]
    k_cols = qkv.columns(range(nq, nq + nk))
    assert matrix_error(k.T, k_cols).rel_error < RTN_BOUND
    assert matrix_error(v.T, k_cols).rel_error > WRONG_BOUND
    assert matrix_error(np.concatenate([q, k, v]).T, qkv).rel_error < RTN_BOUND
    assert matrix_error(np.concatenate([k, q, v]).T, qkv).rel_error > WRONG_BOUND  # q and k in the wrong order


def test_a_checkpoint_of_other_sizes_is_refused(guide_int4, tiny_deep_dir):
    with pytest.raises(UserError) as e:
        compare_weights(None, guide_int4, hf_dir=tiny_deep_dir)
    message = str(e.value)
    assert "\n" not in message and "qkv_proj" in message and "pass the checkpoint this export was made from" in message


def test_no_reference_and_no_checkpoint_is_refused(tiny_onnx_fp32_dir, guide_int4, tmp_path):
    lone = tmp_path / "int4"  # the guide's int4 folder alone: no fp32 twin, no pytorch/ beside it
    lone.mkdir()
    for f in guide_int4.folder.iterdir():
        os.link(f, lone / f.name)  # hard links: symlinks leading out of a model folder are refused
    with pytest.raises(UserError) as e:
        compare_weights(tiny_onnx_fp32_dir, load_model(lone))
    assert "\n" not in str(e.value) and "no Hugging Face checkpoint was found" in str(e.value)
    assert "hf_dir=CHECKPOINT" in str(e.value)
