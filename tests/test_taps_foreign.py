"""Hook points on a graph built by onnxruntime-genai's builder (the original guide's export), against transformers.

- Every hook point is found on the guide's fp32 and int4 decoders, and each is the tensor the node
  names say (o_proj's output, down_proj's output, the next norm's input+skip sum, the final norm).
- `run_with_cache` on the guide's fp32 decoder: the residual stream per layer and the final norm equal
  transformers' hidden states on the same checkpoint.
- `compare_layers` runs across layouts: ours vs the guide's fp32 agree tensor by tensor; ours (or the
  guide's fp32) vs the guide's int4 give the same errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import hf_hidden_states

from qwen3vl_lab.debug.layers import compare_layers
from qwen3vl_lab.generate import prepare_prompt
from qwen3vl_lab.model import load_graph, load_model
from qwen3vl_lab.taps import SKIP_SUM, TappedDecoder, hook_points, run_with_cache

PROMPT = "Hello, who are you?"


@pytest.fixture(scope="module")
def guide_fp32(guide_export_dir):
    return load_model(guide_export_dir, "fp32")


@pytest.fixture(scope="module")
def guide_int4(guide_export_dir):
    return load_model(guide_export_dir, "int4")


def _producers(model):
    """tensor -> (node name, op type, output index) of the decoder graph, read without the mapping."""
    graph = load_graph(model.decoder_file.parent, model.decoder_file.name)
    return {o: (n.name, n.op_type, i) for n in graph.graph.node for i, o in enumerate(n.output) if o}


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_every_hook_point_is_the_tensor_the_builder_names(guide_export_dir, precision):
    model = load_model(guide_export_dir, precision)
    assert model.kind == "guide"
    dec = TappedDecoder(model)
    assert dec.not_found == [] and dec.tapped == hook_points(model)
    made = _producers(model)
    L = model.config.text.num_hidden_layers
    op, node = ("MatMul", "MatMul") if precision == "fp32" else ("MatMulNBits", "MatMul_Q4")
    for i in range(L):
        assert made[dec.tensors[f"layers.{i}.attn_out"]][:2] == (f"/model/layers.{i}/attn/o_proj/{node}", op)
        assert made[dec.tensors[f"layers.{i}.mlp_out"]][:2] == (f"/model/layers.{i}/mlp/down_proj/{node}", op)
        if i < L - 1:  # the next layer's input norm's 4th output (input + skip)
            assert made[dec.tensors[f"layers.{i}.hidden"]] == (f"/model/layers.{i + 1}/input_layernorm/SkipLayerNorm",
                                                               "SkipSimplifiedLayerNormalization", SKIP_SUM)
    # the final norm: output 0 is final_norm; its sum output is not in the file, it is added in memory
    assert made[dec.tensors["final_norm"]] == (f"/model/layers.{L}/final_norm_layernorm/SkipLayerNorm",
                                               "SkipSimplifiedLayerNormalization", 0)
    assert dec.tensors[f"layers.{L - 1}.hidden"] not in made


def test_run_with_cache_on_the_guide_equals_transformers_hidden_states(guide_fp32, tiny_dir, hf_model_factory):
    pytest.importorskip("torch")
    hf = hf_model_factory(tiny_dir)
    p = prepare_prompt(guide_fp32, PROMPT)
    logits, cache = run_with_cache(guide_fp32, p)
    assert set(hook_points(guide_fp32)) <= set(cache)
    before_norm = {}
    hook = hf.model.language_model.norm.register_forward_pre_hook(lambda _, args: before_norm.update(x=args[0][0].numpy()))
    try:
        hidden, hf_logits = hf_hidden_states(hf, p.input_ids)  # embeddings, then after each layer (the last one normed)
    finally:
        hook.remove()
    L = guide_fp32.config.text.num_hidden_layers
    stack = cache.stack("hidden")  # (L, 1, S, H)
    assert stack.shape == (L, 1, p.length, guide_fp32.config.text.hidden_size)
    for i in range(L - 1):
        np.testing.assert_allclose(stack[i, 0], hidden[i + 1], atol=1e-4)
    np.testing.assert_allclose(stack[L - 1, 0], before_norm["x"], atol=1e-4)  # the sum output added in memory
    np.testing.assert_allclose(cache["final_norm"][0], hidden[L], atol=1e-4)
    np.testing.assert_allclose(logits[0], hf_logits, atol=1e-4)
    for i in range(1, L):  # what each block adds: attn_out and mlp_out are the blocks' outputs
        np.testing.assert_allclose(stack[i, 0], stack[i - 1, 0] + cache[f"layers.{i}.attn_out"][0]
                                   + cache[f"layers.{i}.mlp_out"][0], atol=1e-4)


def test_compare_layers_across_layouts(tiny_onnx_fp32_dir, guide_fp32, guide_int4):
    ours = load_model(tiny_onnx_fp32_dir)
    names = [*hook_points(ours), "logits"]
    same = compare_layers(ours, guide_fp32, PROMPT)
    assert [r.name for r in same.rows] == names
    assert max(r.rel_error for r in same.rows) < 1e-4  # two fp32 exports of one checkpoint, tensor by tensor
    vs_ours = compare_layers(ours, guide_int4, PROMPT)
    vs_guide = compare_layers(guide_fp32, guide_int4, PROMPT)
    assert [r.name for r in vs_ours.rows] == [r.name for r in vs_guide.rows] == names
    err = np.array([r.rel_error for r in vs_ours.rows])
    assert np.all(err > 1e-3) and np.all(np.isfinite(err))  # INT4 of random weights: visible everywhere
    np.testing.assert_allclose(err, [r.rel_error for r in vs_guide.rows], rtol=1e-3, atol=1e-5)
