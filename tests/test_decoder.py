"""The Decoder interface, the one generation loop and run_with_cache, against transformers.

- `DecoderIO.read` finds every name of our decoders (teaching and fast) from the graph alone, and
  a decoder whose outputs are spelled `present_key_values.%d.key` runs with the same logits.
- `run_with_cache`'s residual stream per layer and final norm equal transformers' hidden states.
- `generate_step` gives the same tokens through the teaching and the fast decoder, one record per
  token with its logits; teacher forcing is a sampler.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
from helpers import hf_hidden_states

from qwen3vl_lab.decoder import DecoderIO, MissingPiece, OnnxDecoder
from qwen3vl_lab.errors import UserError
from qwen3vl_lab.fast import FastDecoder
from qwen3vl_lab.generate import generate_step, prepare_prompt
from qwen3vl_lab.layout import DECODER_FILE
from qwen3vl_lab.model import load_model
from qwen3vl_lab.positions import Positions
from qwen3vl_lab.sampling import forced, greedy
from qwen3vl_lab.steps import prefill
from qwen3vl_lab.taps import hook_points, run_with_cache

PROMPT = "Hello, who are you?"


@pytest.fixture(scope="module")
def model(tiny_onnx_fp32_dir):
    return load_model(tiny_onnx_fp32_dir)


def test_io_is_read_from_the_graph(model):
    io = model.teaching_decoder.io
    L = model.config.text.num_hidden_layers
    assert io.token_input == "inputs_embeds" and io.positions == "3d" and io.deepstack == "deepstack_embeds"
    assert io.past[0] == ("past_key_values.0.key", "past_key_values.0.value") and len(io.past) == L
    assert io.present[-1] == (f"present.{L - 1}.key", f"present.{L - 1}.value")
    assert io.logits_to_keep == "logits_to_keep" and io.missing == []
    assert (io.kv_heads, io.head_dim, io.hidden_size) == (model.config.text.num_key_value_heads,
                                                          model.config.text.head_dim, model.config.text.hidden_size)
    fast = FastDecoder(model).io
    assert fast.past == io.past and set(fast.other_inputs) == {"cos_cache", "sin_cache", "seqlens_k",
                                                                 "total_sequence_length"}


def _rename_outputs(src, dst, old: str, new: str):
    """A copy of the export folder whose decoder outputs are renamed old -> new (node outputs too)."""
    shutil.copytree(src, dst)
    path = dst / "cpu-fp32" / DECODER_FILE
    graph = onnx.load(str(path), load_external_data=False)
    for node in graph.graph.node:
        node.input[:] = [o.replace(old, new, 1) if o.startswith(old) else o for o in node.input]
        node.output[:] = [o.replace(old, new, 1) if o.startswith(old) else o for o in node.output]
    for out in graph.graph.output:
        if out.name.startswith(old):
            out.name = out.name.replace(old, new)
    onnx.save(graph, str(path))
    return dst


def test_a_decoder_with_present_key_values_outputs_gives_the_same_logits(model, tiny_onnx_fp32_dir, tmp_path):
    other = load_model(_rename_outputs(tiny_onnx_fp32_dir, tmp_path / "renamed", "present.", "present_key_values."))
    assert other.teaching_decoder.io.present[0] == ("present_key_values.0.key", "present_key_values.0.value")
    p = prepare_prompt(model, PROMPT)
    a = [s.tokens[0] for s in generate_step(model, p, greedy, 6, eos_token_ids=[])]
    b = [s.tokens[0] for s in generate_step(other, p, greedy, 6, eos_token_ids=[])]
    assert a == b


def test_io_reader_refuses_graphs_that_are_not_decoders(model, tiny_onnx_fp32_dir):
    with pytest.raises(UserError, match="has no .logits. output.*pass a text decoder graph"):
        DecoderIO.read(model.vision)
    text = model.config.text
    with pytest.raises(UserError, match=r"its config says num_hidden_layers = \d+ but the decoder has \d+ layers"):
        OnnxDecoder(model.decoder, replace(text, num_hidden_layers=text.num_hidden_layers + 1), model.embed)


def test_missing_piece_is_refused_unless_accepted(model):
    """A decoder without 3-D positions refuses a prompt whose rows differ (an image's), and says so when allowed."""
    p = prepare_prompt(model, PROMPT)
    dec = model.teaching_decoder
    one_d = OnnxDecoder(model.decoder, model.config.text, model.embed)
    one_d.io = replace(dec.io, positions="none")  # as the guide's decoder: rotary positions from the mask
    pos = p.positions.position_ids.copy()
    pos[1] += 1  # an image-like prompt: h row differs from t
    with pytest.raises(MissingPiece, match="3-D positions.*--accept_missing"):
        one_d.prefill(one_d.new_cache(1), p.inputs_embeds, pos)
    one_d.accept_missing = True
    one_d.check_prompt(pos, None, p.input_ids, p.inputs_embeds)  # (running it needs a real 1-D graph: test_foreign)
    assert one_d.missing_used and "3-D positions" in one_d.missing_used[0]


def test_generation_loop_same_tokens_teaching_and_fast(model):
    p = prepare_prompt(model, PROMPT)
    teach = list(generate_step(model, p, greedy, 8, eos_token_ids=[]))
    fast = list(generate_step(model, p, greedy, 8, decoder=FastDecoder(model), eos_token_ids=[]))
    assert [s.index for s in teach] == list(range(8)) and teach[-1].finished.all()
    assert [int(s.tokens[0]) for s in teach] == [int(s.tokens[0]) for s in fast]
    for s in teach:  # each record's tokens are the argmax of its own logits
        assert int(s.tokens[0]) == int(s.logits[0].argmax()) and s.seconds >= s.decoder_seconds >= 0
    assert teach[-1].step.cache.length == p.length + 7  # the last token is sampled, not yet fed


def test_teacher_forcing_is_a_sampler(model):
    p = prepare_prompt(model, PROMPT)
    want = [11, 22, 33, 44]
    steps = list(generate_step(model, p, forced(want), 4, eos_token_ids=[]))
    assert [int(s.tokens[0]) for s in steps] == want
    whole = prefill(model, np.concatenate([p.inputs_embeds, model.embed(np.array([want[:3]]))], 1),
                    Positions(np.arange(p.length + 3)[None, None].repeat(3, 0), p.positions.rope_deltas),
                    logits_to_keep=0).logits[0]  # (S + 3, V): the whole sequence at once
    np.testing.assert_allclose(steps[3].logits[0], whole[-1], atol=1e-4)


def test_run_with_cache_equals_transformers_hidden_states(model, tiny_dir, hf_model_factory):
    pytest.importorskip("torch")
    hf = hf_model_factory(tiny_dir)
    p = prepare_prompt(model, PROMPT)
    logits, cache = run_with_cache(model, p)
    assert set(hook_points(model)) <= set(cache)
    hidden, hf_logits = hf_hidden_states(hf, p.input_ids)  # embeddings, then after each layer (the last one normed)
    L = model.config.text.num_hidden_layers
    stack = cache.stack("hidden")  # (L, 1, S, H)
    assert stack.shape == (L, 1, p.length, model.config.text.hidden_size)
    for i in range(L - 1):
        np.testing.assert_allclose(stack[i, 0], hidden[i + 1], atol=1e-4)
    np.testing.assert_allclose(cache["final_norm"][0], hidden[L], atol=1e-4)
    np.testing.assert_allclose(logits[0], hf_logits, atol=1e-4)
    # the residual stream is the sum of what the blocks add
    np.testing.assert_allclose(stack[1, 0], stack[0, 0] + cache["layers.1.attn_out"][0] + cache["layers.1.mlp_out"][0],
                               atol=1e-4)
