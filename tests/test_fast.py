"""The fast path (export/decoder_fast.py + fast.py) computes what the teaching path and transformers compute.

- identical tokens to the teaching loop (steps.py + cache.py), fp32 and INT4, whole and chunked prefill;
- logits within 1e-4 of transformers' PyTorch Qwen3-VL at every step and identical greedy tokens, for
  text prompts (tiny, tiny-deep) and an image prompt with DeepStack;
- the KV buffers are allocated once and written in place (past and present are the same memory);
- prefill computes the lm_head for the last position only, in both decoders;
- `qwen3vl-lab bench` runs on the tiny model and prints its JSON keys (not a timed test).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_one_line_error, run_cli

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.decoder_fast import write_fast_decoder
from qwen3vl_lab.export.exporter import export
from qwen3vl_lab.fast import FastDecoder
from qwen3vl_lab.generate import Prompt, generate_step, generate_tokens, prepare_multimodal_prompt, prepare_prompt
from qwen3vl_lab.layout import FAST_DECODER_FILE
from qwen3vl_lab.model import load_model
from qwen3vl_lab.pipeline import Qwen3VLPipeline
from qwen3vl_lab.positions import Positions
from qwen3vl_lab.sampling import greedy
from qwen3vl_lab.steps import decode_step, prefill

PROMPTS = ["Hello, who are you?", "你好，世界！🌍 naïve café"]
N_NEW = 12
TOL = 1e-4


@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_dir):
    return tiny_onnx_dir  # shared across test files: never modified in place


@pytest.fixture(scope="module")
def models(onnx_dir, tiny_dir, tmp_path_factory):
    """fp32, INT4 (builder recipe: accuracy_level 4) and INT4 with fp32 compute (accuracy_level 1)."""
    from qwen3vl_lab.export.quantize import Int4Recipe

    acc1 = tmp_path_factory.mktemp("fast") / "tiny-acc1"
    export(tiny_dir, acc1, ["int4"], progress=False, log=lambda _: None, recipe=Int4Recipe(accuracy_level=1))
    return {"fp32": load_model(onnx_dir, "fp32"), "int4": load_model(onnx_dir, "int4"),
            "int4-acc1": load_model(acc1, "int4")}


# -- the same tokens as the teaching path ---------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "int4-acc1"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_fast_tokens_equal_teaching_tokens(models, precision, prompt):
    model = models[precision]
    p = prepare_prompt(model, prompt)
    teaching = list(generate_tokens(model, p, greedy, 24, eos_token_ids=[]))
    fast = list(generate_tokens(model, p, greedy, 24, eos_token_ids=[], fast=True))
    assert fast == teaching
    assert len(set(fast)) > 1
    chunked = list(generate_tokens(model, p, greedy, 24, eos_token_ids=[], fast=True, prefill_chunk=3))
    assert chunked == teaching


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fast_int4_accuracy_level_4_differs_only_at_near_ties(models, prompt):
    """accuracy_level 4 rounds each activation block to int8, so the two graphs' last-ulp differences
    (fused vs op-by-op RMSNorm) can move a logit by ~1e-2: tokens agree until a near-tie, never later."""
    model = models["int4"]
    p = prepare_prompt(model, prompt)
    teaching = list(generate_tokens(model, p, greedy, 24, eos_token_ids=[]))
    fast = list(generate_tokens(model, p, greedy, 24, eos_token_ids=[], fast=True))
    if fast == teaching:
        return
    k = next(i for i, (a, b) in enumerate(zip(fast, teaching)) if a != b)
    step = prefill(model, p.inputs_embeds, p.positions)  # the teaching logits at the first difference
    for tok in teaching[:k]:
        step = decode_step(model, np.array([[tok]]), step.cache, p.positions.rope_deltas)
    logits = step.logits[0]
    assert logits.argmax() == teaching[k]
    assert logits[teaching[k]] - logits[fast[k]] < 0.05, "the fast path left the teaching path at a clear choice"


def test_fast_sampling_with_a_seed_equals_teaching(models):
    from qwen3vl_lab.sampling import SamplingConfig, make_sampler

    model = models["fp32"]
    p = prepare_prompt(model, PROMPTS[0])
    config = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1, seed=7)
    teaching = list(generate_tokens(model, p, make_sampler(config), 20, eos_token_ids=[]))
    fast = list(generate_tokens(model, p, make_sampler(config), 20, eos_token_ids=[], fast=True))
    assert fast == teaching


def test_fast_logits_equal_teaching_logits_and_cache(models):
    """Step by step: same logits, and the shared buffers hold exactly the teaching cache's keys/values."""
    model = models["fp32"]
    p = prepare_prompt(model, PROMPTS[0])
    step = prefill(model, p.inputs_embeds, p.positions)
    dec = FastDecoder(model)
    assert dec.table is not None  # decode steps read embedding rows from the memory-mapped table
    buf = dec.new_cache(batch_size=1, capacity=p.length + 8)
    buffers = [k.__array_interface__["data"][0] for k in buf.keys + buf.values]
    fast_step = dec.prefill(buf, p.inputs_embeds, p.positions.position_ids)
    assert np.abs(fast_step.logits - step.logits).max() <= 1e-5
    for _ in range(6):
        token = int(step.logits[0].argmax())
        step = decode_step(model, np.array([[token]]), step.cache, p.positions.rope_deltas)
        fast_step = dec.decode(fast_step.cache, np.array([token]), p.positions.rope_deltas)
        assert np.abs(fast_step.logits - step.logits).max() <= 1e-5
    assert [k.__array_interface__["data"][0] for k in buf.keys + buf.values] == buffers  # never reallocated
    T = step.cache.length
    assert fast_step.cache is buf and buf.length == T
    for i in range(model.config.text.num_hidden_layers):  # written in place by GroupQueryAttention
        np.testing.assert_allclose(buf.keys[i][:, :, :T], step.cache.keys[i], atol=1e-5)
        np.testing.assert_allclose(buf.values[i][:, :, :T], step.cache.values[i], atol=1e-5)
        assert not buf.keys[i][:, :, T:].any()  # the rest of the buffer is untouched


def test_embedding_session_fallback_gives_the_same_tokens(models, monkeypatch):
    import qwen3vl_lab.fast as fast

    model = models["fp32"]
    p = prepare_prompt(model, PROMPTS[0])
    mapped = list(generate_tokens(model, p, greedy, 10, eos_token_ids=[], fast=True))
    monkeypatch.setattr(fast, "embedding_table", lambda model: None)  # e.g. an embedding graph of another form
    assert list(generate_tokens(model, p, greedy, 10, eos_token_ids=[], fast=True)) == mapped


def test_batch_of_equal_prompts_gives_each_rows_tokens(models):
    model = models["int4"]
    p = prepare_prompt(model, PROMPTS[0])
    alone = list(generate_tokens(model, p, greedy, 10, eos_token_ids=[], fast=True))
    batch = Prompt(np.repeat(p.input_ids, 3, 0), np.repeat(p.inputs_embeds, 3, 0),
                   Positions(np.repeat(p.positions.position_ids, 3, 1), np.repeat(p.positions.rope_deltas, 3, 0)))
    rows = np.stack([s.tokens for s in generate_step(model, batch, greedy, 10, decoder=FastDecoder(model),
                                                     eos_token_ids=[])])  # (steps, B)
    for b in range(3):
        assert rows[:, b].tolist() == alone


def test_left_padded_batches_are_refused(models):
    model = models["fp32"]
    p = prepare_prompt(model, PROMPTS[0])
    mask = np.ones((1, p.length), np.int64)
    mask[0, 0] = 0
    padded = Prompt(p.input_ids, p.inputs_embeds, p.positions, None, mask)
    with pytest.raises(UserError, match="left-padded"):
        next(generate_tokens(model, padded, greedy, 3, fast=True))


# -- prefill computes logits for one row ------------------------------------------------------------
class RecordingSession:
    """Wraps an InferenceSession and records the shape of every output it returns."""

    def __init__(self, session):
        self.session, self.shapes = session, []

    def run(self, names, feeds):
        out = self.session.run(names, feeds)
        self.shapes.append({n: o.shape for n, o in zip(names, out)})
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_prefill_runs_the_lm_head_on_the_last_position_only(onnx_dir):
    model = load_model(onnx_dir, "fp32")
    assert "logits_to_keep" in model.decoder_inputs  # an optional input (initializer): fed by steps.prefill
    model.decoder_session = RecordingSession(model.decoder)
    p = prepare_prompt(model, PROMPTS[0])
    V = model.config.text.vocab_size
    step = prefill(model, p.inputs_embeds, p.positions)
    assert model.decoder_session.shapes[-1]["logits"] == (1, 1, V)  # not (1, S, V)
    assert step.logits.shape == (1, V)
    prefill(model, p.inputs_embeds, p.positions, logits_to_keep=0)
    assert model.decoder_session.shapes[-1]["logits"] == (1, p.length, V)
    dec = FastDecoder(load_model(onnx_dir, "fp32", open_decoder=False))
    buf = dec.new_cache(1, p.length + 1)
    assert dec.prefill(buf, p.inputs_embeds, p.positions.position_ids).logits.shape == (1, V)
    assert buf.logits.shape == (1, 1, V)  # the bound output: a (1, S, V) result would be an error


# -- the fast graph file ------------------------------------------------------------------------------
def _external(t) -> dict:
    return {e.key: e.value for e in t.external_data}


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_fast_graph_uses_fused_ops_and_reads_the_same_weights(onnx_dir, precision):
    from qwen3vl_lab.export.decoder_fast import SourceDecoder

    folder = onnx_dir / f"cpu-{precision}"
    fast = onnx.load(str(folder / FAST_DECODER_FILE), load_external_data=False)
    plain = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in fast.graph.node]
    assert {"GroupQueryAttention", "MRotaryEmbedding", "SkipSimplifiedLayerNormalization",
            "SimplifiedLayerNormalization"} <= set(ops)
    plain_refs = {t.name: _external(t) for t in plain.graph.initializer}
    shared = [t for t in fast.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
              and _external(t)["location"] == "model.onnx.data"]
    fused = [t for t in shared if t.name.endswith("+fused")]  # INT4 q/k/v, gate/up: spans of several (test_shared_files)
    assert shared and all(plain_refs[t.name] == _external(t) for t in shared if t not in fused)  # the very same bytes
    layers = 4
    if precision == "fp32":  # every weight shared, one MatMul per linear layer (7 per layer + lm_head)
        assert ops.count("MatMul") == 7 * layers + 1
        assert not (folder / (FAST_DECODER_FILE + ".data")).exists()
        assert (folder / FAST_DECODER_FILE).stat().st_size < 200_000  # the graph only
        return
    # INT4: q/k/v and gate/up fused: 4 MatMulNBits per layer + lm_head, over concatenated packed bytes
    assert ops.count("MatMulNBits") == 4 * layers + 1
    source = SourceDecoder(plain, folder)
    fused = SourceDecoder(fast, folder)
    qkv = next(n for n in fast.graph.node if n.op_type == "MatMulNBits" and "q_proj" in n.input[1])
    for j in (1, 2):  # packed weights, scales
        parts = [source.array(source.node_for(f"model.language_model.layers.0.self_attn.{x}_proj.weight").input[j])
                 for x in "qkv"]
        np.testing.assert_array_equal(fused.array(qkv.input[j]), np.concatenate(parts))


def test_missing_fast_graph_is_a_one_line_error_and_the_builder_writes_it(onnx_dir, tmp_path, capsys):
    """The runtime only reads model-fast.onnx (it never imports the builder): a folder without it
    (an older export, a quantize_folder / sweep variant) is refused before any prompt runs, naming
    the file and both fixes (re-export, or run without --fast; no Python call advised on the command line);
    `write_fast_decoder` then makes the same folder run with the same tokens."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(onnx_dir / "cpu-int4", copy)
    (copy / FAST_DECODER_FILE).unlink()
    (copy / (FAST_DECODER_FILE + ".data")).unlink(missing_ok=True)
    with pytest.raises(UserError, match="model-fast.onnx is missing.*qwen3vl-lab export.*without --fast"):
        Qwen3VLPipeline(copy, "int4", fast=True)
    model = load_model(copy, "int4", open_decoder=False)
    p = prepare_prompt(model, PROMPTS[0])
    with pytest.raises(UserError, match="model-fast.onnx is missing"):
        list(generate_tokens(model, p, greedy, 3, eos_token_ids=[], fast=True))
    code, out, err = run_cli(capsys, "generate", "--model_dir", copy, "--text_precision", "int4", "--prompt", "Hi",
                             "--fast", "--max_new_tokens", "2")
    assert_one_line_error(code, err, FAST_DECODER_FILE, "qwen3vl-lab export")
    assert out == "" and not (copy / FAST_DECODER_FILE).exists()  # nothing printed, nothing written

    write_fast_decoder(copy)  # the builder step `qwen3vl-lab export` runs for every precision folder
    rebuilt, exported = (load_model(folder, "int4", open_decoder=False) for folder in (copy, onnx_dir))
    tokens = [list(generate_tokens(m, p, greedy, 3, eos_token_ids=[], fast=True)) for m in (rebuilt, exported)]
    assert len(tokens[0]) == 3 and tokens[0] == tokens[1] and rebuilt.decoder_session is None


def test_pipeline_fast_flag(onnx_dir):
    fast = Qwen3VLPipeline(onnx_dir, "int4", fast=True)
    slow = Qwen3VLPipeline(onnx_dir, "int4")
    kw = dict(max_new_tokens=15, temperature=0.0)
    assert fast.generate(PROMPTS[0], **kw) == slow.generate(PROMPTS[0], **kw)
    assert fast.model.decoder_session is None  # the teaching decoder was never loaded


# -- parity with transformers -------------------------------------------------------------------------
def fast_teacher_forced(model, prompt: Prompt, forced: np.ndarray) -> np.ndarray:
    """(len(forced), V): the fast decoder's logits that chose each of transformers' tokens."""
    dec = FastDecoder(model)
    step = dec.prefill(dec.new_cache(1, prompt.length + len(forced)), prompt.inputs_embeds,
                       prompt.positions.position_ids, deepstack=prompt.deepstack)
    logits = [step.logits[0].copy()]
    for tok in forced[:-1]:
        step = dec.decode(step.cache, np.array([tok]), prompt.positions.rope_deltas)
        logits.append(step.logits[0].copy())
    return np.stack(logits)


def hf_greedy(hf, ids: np.ndarray, n_new: int, **kw):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        hf.model.rope_deltas = None
        out = hf.generate(torch.tensor(ids), max_new_tokens=n_new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=151643, **kw)
        hf.model.rope_deltas = None
    return out.sequences[0, ids.shape[1]:].numpy(), np.stack([l[0].numpy() for l in out.logits])


@pytest.fixture(scope="module")
def tiny_deep_fp32(tiny_deep_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast") / "tiny-deep"
    export(tiny_deep_dir, out, progress=False, log=lambda _: None)
    return load_model(out, open_decoder=False)


@pytest.mark.parametrize("preset", ["tiny", "tiny-deep"])
def test_fast_text_parity_with_transformers(preset, models, tiny_deep_fp32, tiny_dir, tiny_deep_dir,
                                            hf_model_factory):
    pytest.importorskip("torch")
    model = models["fp32"] if preset == "tiny" else tiny_deep_fp32
    hf = hf_model_factory(tiny_dir if preset == "tiny" else tiny_deep_dir)
    for text in PROMPTS:
        p = prepare_prompt(model, text)
        ref_tokens, ref_logits = hf_greedy(hf, p.input_ids, N_NEW)
        ours = fast_teacher_forced(model, p, ref_tokens)
        assert np.abs(ours - ref_logits).max() <= TOL
        assert list(generate_tokens(model, p, greedy, N_NEW, eos_token_ids=[], fast=True)) == ref_tokens.tolist()


@pytest.fixture(scope="module")
def rotary_in_gqa(onnx_dir, tmp_path_factory):
    """The fp32 fast decoder built with RoPE inside GroupQueryAttention (rotary="gqa"), projections separate."""
    import shutil

    from qwen3vl_lab.export.decoder_fast import build_fast_decoder

    folder = tmp_path_factory.mktemp("fast") / "gqa-rotary" / "cpu-fp32"
    shutil.copytree(onnx_dir / "cpu-fp32", folder)
    model = load_model(folder, "fp32", open_decoder=False)
    source = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    graph = build_fast_decoder(model.config, source, folder, fuse=False, rotary="gqa")
    assert {n.op_type for n in graph.graph.node}.isdisjoint({"MRotaryEmbedding"})
    onnx.save_model(graph, str(folder / FAST_DECODER_FILE))
    return load_model(folder, "fp32", open_decoder=False)


def test_rotary_in_gqa_text_parity_with_transformers(rotary_in_gqa, tiny_dir, hf_model_factory):
    """A text token has t = h = w, so its MRoPE is the 1-D rotation GroupQueryAttention's do_rotary applies at
    row 0 of position_ids: logits within 1e-4 of transformers at every step, the same greedy tokens."""
    pytest.importorskip("torch")
    hf = hf_model_factory(tiny_dir)
    for text in PROMPTS:
        p = prepare_prompt(rotary_in_gqa, text)
        ref_tokens, ref_logits = hf_greedy(hf, p.input_ids, N_NEW)
        assert np.abs(fast_teacher_forced(rotary_in_gqa, p, ref_tokens) - ref_logits).max() <= TOL
        assert list(generate_tokens(rotary_in_gqa, p, greedy, N_NEW, eos_token_ids=[], fast=True)) == ref_tokens.tolist()


def test_rotary_in_gqa_decodes_at_cache_length_plus_rope_delta(rotary_in_gqa, models):
    """After an image the decode position is cache length + rope_delta (delta < 0): the GQA rotation there equals
    MRotaryEmbedding's with three equal rows (the graph the image parity test checks against transformers)."""
    p = prepare_prompt(models["fp32"], PROMPTS[0])
    logits = []
    for model in (models["fp32"], rotary_in_gqa):
        dec = FastDecoder(model)
        step = dec.prefill(dec.new_cache(1, p.length + 4), p.inputs_embeds, p.positions.position_ids)
        for token in (11, 42, 7):
            step = dec.decode(step.cache, np.array([token]), np.array([[-5]]))
        logits.append(step.logits.copy())
    assert np.abs(logits[0] - logits[1]).max() <= 1e-5


def test_fast_image_parity_with_transformers_incl_deepstack(models, tiny_dir, hf_model_factory):
    torch = pytest.importorskip("torch")
    from matplotlib import cbook

    from qwen3vl_lab.positions import mm_token_type_ids

    model, hf = models["fp32"], hf_model_factory(tiny_dir)
    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    p = prepare_multimodal_prompt(model, "Describe what you see.", images=[photo], image_size=256)
    assert p.deepstack is not None and p.positions.rope_deltas[0, 0] < 0
    from qwen3vl_lab.generate import preprocess_visuals

    visuals = preprocess_visuals(model, [photo], None, 256)
    kw = dict(pixel_values=torch.tensor(visuals.pixel_values), image_grid_thw=torch.tensor(visuals.image_grid_thw),
              mm_token_type_ids=torch.tensor(mm_token_type_ids(p.input_ids)))
    ref_tokens, ref_logits = hf_greedy(hf, p.input_ids, N_NEW, **kw)
    ours = fast_teacher_forced(model, p, ref_tokens)
    assert np.abs(ours - ref_logits).max() <= TOL
    assert list(generate_tokens(model, p, greedy, N_NEW, eos_token_ids=[], fast=True)) == ref_tokens.tolist()
    without = Prompt(p.input_ids, p.inputs_embeds, p.positions, None)  # DeepStack dropped: far off
    assert np.abs(fast_teacher_forced(model, without, ref_tokens[:1]) - ref_logits[:1]).max() > 100 * TOL


# -- the bench command (figures are printed, never asserted) -------------------------------------------
def test_bench_command_prints_json(onnx_dir):
    out = subprocess.run([sys.executable, "-m", "qwen3vl_lab", "bench", "--model_dir", str(onnx_dir),
                          "--text_precision", "int4", "--prompt_tokens", "16", "--new_tokens", "8", "--runs", "1",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("decode_tok_s", "prefill_tok_s", "floor_fraction", "bandwidth_gb_s", "weight_bytes",
                "peak_rss_bytes", "overhead_ms_per_token"):
        assert key in result
    assert result["decode_tok_s"] > 0 and result["weight_bytes"] > 0
    assert "decode" in out.stdout and "bandwidth" in out.stdout
    # the floor fraction is (weight bytes / measured bandwidth) / measured step time, as printed
    floor_s = result["weight_bytes"] / (result["bandwidth_gb_s"] * 1e9)
    assert result["floor_ms_per_token"] == pytest.approx(1e3 * floor_s, rel=1e-9)
    assert result["floor_fraction"] == pytest.approx(floor_s / (result["ms_per_token"] / 1e3), rel=1e-9)
    assert result["bandwidth_gb_s"] >= max(result["bandwidth_gb_s_samples"]) and result["floor_fraction"] <= 1
    if result["bandwidth_source"] == "probe":  # the best probe run (else the fastest decode step's read)
        assert result["bandwidth_gb_s"] == pytest.approx(max(result["bandwidth_gb_s_samples"]), rel=1e-9)
    assert "GB/s min / median / max" in out.stdout  # the probe's spread
    assert (f"= {result['floor_ms_per_token']:.2f} ms per step; measured {result['ms_per_token']:.2f} ms -> "
            f"{100 * result['floor_fraction']:.0f}% of the floor") in out.stdout
    assert result["bandwidth_probe"].startswith("onnxruntime fp32 MatMul 1x4096 @ 4096x")
    probe_mib = int(result["bandwidth_probe"].split("(")[1].split(" MiB")[0])  # its size and page coverage, as printed
    assert 0 <= result["bandwidth_probe_huge_bytes"] <= probe_mib * 2**20
    assert f"{result['bandwidth_probe_huge_bytes'] / 2**20:.0f} MiB of it on 2 MiB pages" in result["bandwidth_probe"]
    assert result["huge_pages"] == "on" and "of our memory on 2 MiB pages" in out.stdout
    assert result["recipe"]["block_size"] == [32] and "weights     4-bit, block 32" in out.stdout
    assert result["others_busy_cores"] is None or result["others_busy_cores"] >= 0


def test_floor_is_the_sustained_bandwidth_and_never_above_100_percent():
    """The floor divides by the best probe run (STREAM's convention), not the median a loaded moment drags
    down; a decode step that read its weights faster than every probe run makes the bandwidth its own."""
    from qwen3vl_lab.apps.bench import sustained_bandwidth

    gb = 1e9
    # probe: 1 GB in 0.05 s (20 GB/s) at best, loaded runs at 10 and 5 GB/s; weights 1 GB, steps 0.1 s
    floor = sustained_bandwidth(int(gb), int(gb), [0.1, 0.05, 0.2, 0.1], [0.1, 0.1, 0.12], [0.1, 0.11])
    assert floor.source == "probe" and floor.bandwidth == pytest.approx(20 * gb)
    assert floor.seconds == pytest.approx(0.05) and floor.fraction == pytest.approx(0.5)
    assert floor.best_run_fraction == pytest.approx(0.5)
    assert sorted(floor.probe_samples) == pytest.approx([5 * gb, 10 * gb, 10 * gb, 20 * gb])
    # every probe run slowed by load (5 GB/s at best) while a step read 1 GB in 0.08 s (12.5 GB/s): the median
    # probe would print 250%; the floor is that step's bandwidth and the share stays <= 100%
    floor = sustained_bandwidth(int(gb), int(gb), [0.2, 0.25, 0.3], [0.08, 0.1, 0.12], [0.09, 0.1])
    assert floor.source == "decode step" and floor.bandwidth == pytest.approx(12.5 * gb)
    assert floor.fraction == pytest.approx(0.08 / 0.1) and floor.best_run_fraction == pytest.approx(0.08 / 0.09)
    # a slow outlier probe run (or a dozen) does not move the floor: it holds still across benches
    steady = sustained_bandwidth(int(gb), int(gb), [0.05, *[0.4] * 12], [0.1], [0.1])
    assert steady.fraction == pytest.approx(0.5)


def test_spinning_default_follows_what_others_use():
    """allow_spinning=None spins only when the other processes leave each of our threads a core; set, it is obeyed."""
    from qwen3vl_lab.model import RuntimeOptions, spinning_pays

    assert spinning_pays(2, busy=0.0, cores=2) and spinning_pays(2, busy=0.4, cores=2)  # quiet
    assert not spinning_pays(2, busy=1.0, cores=2) and not spinning_pays(2, busy=12.0, cores=2)  # others want cores
    assert spinning_pays(1, busy=1.2, cores=2) and not spinning_pays(None, busy=1.2, cores=2)  # None: a thread per core
    auto = RuntimeOptions(threads=1)
    assert auto.allow_spinning is None and auto.resolved().allow_spinning == auto.spinning()
    assert RuntimeOptions(allow_spinning=True).resolved().allow_spinning is True
    for forced in (True, False):
        entry = RuntimeOptions(allow_spinning=forced).session_options().get_session_config_entry(
            "session.intra_op.allow_spinning")
        assert entry == ("1" if forced else "0")


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads /proc/stat (Linux)")
def test_others_busy_cores_sees_another_process(monkeypatch):
    """A process spinning on a core while the sample is taken counts as about one busy core (never ours)."""
    import time

    from qwen3vl_lab import limits

    monkeypatch.setattr(limits, "_busy_sample", None)  # no cached sample
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        busy = limits.others_busy_cores(window=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6
    assert limits.others_busy_cores() == busy  # the sample is reused (BUSY_CACHE_S)


def test_profile_summary_attributes_each_kernel_to_its_step():
    """summarize(): kernel events sum per op within their model_run, median over steps; warm-up runs are dropped."""
    from qwen3vl_lab.apps.bench_profile import summarize

    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def kernel(ts, dur, op):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    trace = [run(0, 900), kernel(10, 800, "MatMulNBits"),  # warm-up: not counted
             run(1000, 500), kernel(1010, 100, "MatMulNBits"), kernel(1200, 100, "MatMulNBits"), kernel(1300, 50, "Add"),
             run(2000, 400), kernel(2010, 300, "MatMulNBits"), kernel(2350, 30, "Add"),
             run(3000, 9000), kernel(3010, 8000, "MatMulNBits"), kernel(3100, 40, "Add")]  # a preempted step
    p = summarize(trace, 3, "g")
    ops = {o.op: o for o in p.ops}
    assert ops["MatMulNBits"].ms_per_step == pytest.approx(0.3) and ops["MatMulNBits"].nodes_per_step == 4 / 3
    assert ops["Add"].ms_per_step == pytest.approx(0.04) and p.ops[0].op == "MatMulNBits"
    assert p.step_ms == pytest.approx(0.5) and p.kernel_ms == pytest.approx(0.33) and p.other_ms == pytest.approx(0.17)


def test_bench_profile_prints_op_times_of_every_node(onnx_dir):
    """`bench --profile` on the tiny INT4 export: each MatMulNBits of model-fast.onnx is counted once per step."""
    out = subprocess.run([sys.executable, "-m", "qwen3vl_lab", "bench", "--model_dir", str(onnx_dir),
                          "--text_precision", "int4", "--profile", "--runs", "1", "--threads", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = json.loads(out.stdout.strip().splitlines()[-1])["profile"]["ours"]
    graph = onnx.load(str(onnx_dir / "cpu-int4" / FAST_DECODER_FILE), load_external_data=False).graph
    assert ours["ops"]["MatMulNBits"]["nodes_per_step"] == sum(n.op_type == "MatMulNBits" for n in graph.node)
    assert 0 < ours["kernel_ms"] <= ours["step_ms"]
    assert "| MatMulNBits |" in out.stdout and "| step (model_run) |" in out.stdout


def test_bench_grid_times_each_cell_or_says_why_not(onnx_dir, tmp_path):
    """`bench --grid`: every (context, batch) cell is timed, or skipped with the reason when its KV buffers exceed
    --grid_memory; the figure is written where --plot says."""
    from qwen3vl_lab.apps.bench_profile import GRID_BATCHES, GRID_CONTEXTS, kv_bytes
    from qwen3vl_lab.config import ModelConfig

    out = subprocess.run([sys.executable, "-m", "qwen3vl_lab", "bench", "--model_dir", str(onnx_dir),
                          "--text_precision", "int4", "--grid", "--grid_memory", "0.0025", "--runs", "1",
                          "--threads", "1", "--plot", str(tmp_path / "grid.png"), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["grid"]
    assert [(r["context"], r["batch_size"]) for r in rows] == [(c, b) for c in GRID_CONTEXTS for b in GRID_BATCHES]
    text = ModelConfig.from_dict(json.loads((onnx_dir / "cpu-int4" / "qwen3vl_lab.json").read_text())["config"]).text
    for r in rows:
        assert r["kv_bytes"] == kv_bytes(text, r["context"], r["batch_size"])
        if r["kv_bytes"] > 0.0025e9:
            assert "skipped" in r and "ours" not in r and "--grid_memory" in r["skipped"]
        else:
            assert r["ours"]["tok_s"] == pytest.approx(r["batch_size"] * 1e3 / r["ours"]["ms_per_step"])
    assert any("skipped" in r for r in rows) and any("ours" in r for r in rows)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_bandwidth_probe_is_an_onnxruntime_gemv_over_its_whole_weight(tmp_path):
    """What `bench` times for the bandwidth: x (1, K) @ W (K, N), W a prepacked initializer read whole each run."""
    import onnxruntime as ort

    from qwen3vl_lab.apps.bench import bandwidth_buffer_bytes, largest_cache_bytes
    from qwen3vl_lab.apps.bench_workers import GEMV_K, GemvEngine, _write_gemv

    assert bandwidth_buffer_bytes() >= max(256 * 2**20, 8 * largest_cache_bytes())
    _write_gemv(tmp_path / "g.onnx", GEMV_K, 64)
    w = np.fromfile(tmp_path / "g.data", np.float32).reshape(GEMV_K, 64)
    x = np.random.default_rng(0).standard_normal((1, GEMV_K), dtype=np.float32)
    y = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-3)
    probe = GemvEngine(str(tmp_path), threads=1, spinning=False, nbytes=4 * GEMV_K * 64)
    timed = probe.run(3)
    assert timed["bytes"] == w.nbytes and len(timed["seconds"]) == 3 and min(timed["seconds"]) > 0


@pytest.mark.parametrize("engine,precision", [("torch", "fp32"), ("genai", "int4")])
def test_bench_against_another_engine_prints_the_ratio(onnx_dir, tiny_dir, tmp_path, engine, precision):
    pytest.importorskip("torch" if engine == "torch" else "onnxruntime_genai")
    out = subprocess.run([sys.executable, "-m", "qwen3vl_lab", "bench", "--model_dir", str(onnx_dir),
                          "--text_precision", precision, "--prompt_tokens", "8", "--new_tokens", "4", "--runs", "1",
                          "--threads", "1", "--image_size", "0", "--vs", engine, "--hf_dir", str(tiny_dir),
                          "--genai_dir", str(tmp_path / "genai"), "--spinning", "off", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result[f"{engine}_decode_tok_s"] > 0 and result["ratio"] > 0
    assert f"vs {engine}" in out.stdout
    if engine == "genai":  # at its defaults (onnxruntime's spinning) and with our spinning setting (off, as asked)
        assert result["genai_matched_decode_tok_s"] > 0 and result["matched_ratio"] > 0
        assert result["genai_matched_spinning"] == "off" and "vs genai (spinning off, as ours)" in out.stdout
    if engine == "genai":  # its builder's export of the same checkpoint, with our INT4 recipe
        graph = onnx.load(str(tmp_path / "genai" / "model.onnx"), load_external_data=False)
        nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
        attrs = {(a.name, onnx.helper.get_attribute_value(a)) for a in nbits[0].attribute}
        assert {("bits", 4), ("block_size", 32), ("accuracy_level", 4)} <= attrs
        assert result["recipes_match"] and result["genai_recipe"] == result["recipe"]
        assert "(the same as ours)" in out.stdout
        genai = json.loads((tmp_path / "genai" / "genai_config.json").read_text())  # threads went over it, not in it
        assert "intra_op_num_threads" not in genai["model"]["decoder"].get("session_options", {})


def test_graph_recipe_reads_the_graphs_own_attributes(models):
    """What each decoder graph holds, read from its MatMulNBits nodes: the recipes the two exports were made with."""
    from qwen3vl_lab.apps.bench import graph_recipe, recipe_text

    vocab = models["int4"].config.text.vocab_size
    for name, level in (("int4", 4), ("int4-acc1", 1)):
        recipe = graph_recipe(models[name].fast_decoder_file(), vocab)
        assert recipe == {"block_size": [32], "accuracy_level": [level], "bits": [4], "lm_head": "int4",
                          "zero_points": False}
        assert recipe_text(recipe) == f"4-bit, block 32, accuracy_level {level}, int4 lm_head, symmetric"
    fp32 = graph_recipe(models["fp32"].fast_decoder_file(), vocab)
    assert fp32["bits"] == [] and recipe_text(fp32) == "no MatMulNBits (fp32 weights)"


def test_graph_weight_bytes_reads_checked_lengths(tmp_path):
    """The bytes one decode step reads: every external tensor's length, each entry checked (junk is one line)."""
    from onnx import TensorProto, helper

    from qwen3vl_lab.apps.bench import graph_weight_bytes

    def graph(length: str) -> Path:
        w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "g.data"), ("offset", "0"), ("length", length)):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        b = TensorProto(name="B", data_type=TensorProto.FLOAT, dims=[4], float_data=[0.0] * 4)
        g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, b])
        path = tmp_path / "g.onnx"
        onnx.save_model(helper.make_model(g), str(path))
        return path

    assert graph_weight_bytes(graph("64")) == 64 + 16
    with pytest.raises(UserError, match="external_data length '6e1', not a whole number"):
        graph_weight_bytes(graph("6e1"))


def test_genai_is_built_with_our_recipe_in_a_folder_of_its_own():
    """Our export's block size / accuracy level / symmetry become the builder's options; a non-default recipe gets
    its own default folder, so a build for one recipe is never taken for another's."""
    from qwen3vl_lab.apps.bench import BenchConfig, default_genai_dir, genai_options
    from qwen3vl_lab.export.quantize import Int4Recipe

    assert genai_options(None) == ["block_size=32", "accuracy_level=4", "is_symmetric=true"]
    assert genai_options(Int4Recipe(block_size=128, symmetric=False)) == [
        "block_size=128", "accuracy_level=4", "is_symmetric=false"]
    cfg = BenchConfig(model_dir="out", precision="int4")
    assert default_genai_dir(cfg, Int4Recipe()) == Path("out/genai-cpu-int4")
    assert default_genai_dir(cfg, Int4Recipe(block_size=128)) == Path("out/genai-cpu-int4-b128-acc4-sym")
    assert default_genai_dir(BenchConfig(model_dir="out"), None) == Path("out/genai-cpu-fp32")


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def test_huge_pages_change_no_token(onnx_dir, capsys):
    """The same export with its weights on 2 MiB pages (the default) and on 4 KiB pages: the same greedy tokens;
    `generate --huge_pages off` gives the default's answer."""
    from qwen3vl_lab.model import RuntimeOptions

    huge, small = (load_model(onnx_dir, "int4", RuntimeOptions(threads=1, huge_pages=h)) for h in (True, False))
    p = prepare_prompt(huge, PROMPTS[0])
    assert (list(generate_tokens(huge, p, greedy, 12, eos_token_ids=[], fast=True))
            == list(generate_tokens(small, p, greedy, 12, eos_token_ids=[], fast=True)))
    answers = []
    for pages in ("on", "off"):
        code, out, err = run_cli(capsys, "generate", "--model_dir", onnx_dir, "--text_precision", "int4", "--prompt",
                                 "Hi", "--max_new_tokens", "4", "--no_sample", "--huge_pages", pages, "--json")
        assert code == 0, err
        answers.append(json.loads(out.strip().splitlines()[-1])["token_ids"])
    assert answers[0] == answers[1]


def test_new_ranges_are_only_the_memory_that_appeared():
    """The kernel merges a new mapping into its neighbours: only the parts not mapped before count as new."""
    from qwen3vl_lab.hugepages import new_ranges

    assert new_ranges({(10, 20), (30, 40)}, {(5, 45)}) == {(5, 10), (20, 30), (40, 45)}  # merged around old ones
    assert new_ranges({(10, 20)}, {(10, 20), (50, 60)}) == {(50, 60)}
    assert new_ranges({(10, 20)}, {(10, 20)}) == set() and new_ranges(set(), {(1, 2)}) == {(1, 2)}


@pytest.mark.skipif(not THP.is_file() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_huge_pages_back_only_what_appears_inside_the_block():
    """Memory mapped inside `huge_pages(True)` ends on 2 MiB pages; memory that was there before is untouched.
    (Plain anonymous mmaps, as malloc makes for onnxruntime: numpy advises huge pages for its own arrays.)"""
    import mmap

    from qwen3vl_lab.hugepages import anon_huge_bytes, huge_pages

    size = 64 * 2**20

    def mapped() -> mmap.mmap:  # 64 MiB, every page touched
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block.write(b"\x01" * size)
        return block

    def huge_kb_at(block) -> int:  # AnonHugePages of the mapping that holds the middle of this block
        address = np.frombuffer(block, np.uint8).ctypes.data + size // 2
        inside = False
        with open("/proc/self/smaps", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and not fields[0].endswith(":"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    inside = start <= address < end
                elif inside and fields[0] == "AnonHugePages:":
                    return int(fields[1])
        raise AssertionError("block not mapped")

    before = mapped()
    with huge_pages(False) as skipped:
        also_small = mapped()
    assert skipped == [0] and huge_kb_at(before) == 0 and huge_kb_at(also_small) == 0
    total = anon_huge_bytes()
    with huge_pages(True) as collapsed:
        weights = mapped()
    if collapsed[0] == 0:
        pytest.skip("this kernel refused MADV_COLLAPSE (Linux < 6.1)")
    assert collapsed[0] >= size - 2 * 2**20 and huge_kb_at(weights) * 1024 >= 2 * 2**20
    assert anon_huge_bytes() >= total + size - 2 * 2**20
    assert huge_kb_at(before) == 0 and huge_kb_at(also_small) == 0  # only what appeared inside the block
    assert weights[:] == b"\x01" * size  # the data survives the move


def test_bench_huge_pages_ab_runs_a_second_copy_in_turn(onnx_dir, capsys):
    """`--huge_pages ab`: a second copy of our model on 4 KiB pages runs alternating with ours; the ratio is the
    two medians', both load times are printed; an A/B of timed runs only."""
    code, out, err = run_cli(capsys, "bench", "--model_dir", onnx_dir, "--text_precision", "int4", "--prompt_tokens",
                             "8", "--new_tokens", "4", "--runs", "2", "--image_size", "0", "--huge_pages", "ab", "--json")
    assert code == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["huge_pages"] == "ab" and len(r["ours_4k_decode_tok_s_runs"]) == 2 and r["ours_4k_load_s"] > 0
    assert r["huge_pages_ratio"] == pytest.approx(r["decode_tok_s"] / r["ours_4k_decode_tok_s"])
    assert f"huge/4 KiB {r['huge_pages_ratio']:.3f}x" in out and f"opened in {r['ours_4k_load_s']:.1f} s" in out
    code, _, err = run_cli(capsys, "bench", "--model_dir", onnx_dir, "--huge_pages", "ab", "--profile")
    assert code == 2 and "--huge_pages ab is an A/B of the timed runs" in err


def test_bench_kernels_times_each_block_size(onnx_dir, capsys):
    """`bench --kernels`: one MatMulNBits of the model's width per (bits, block), the figures from their own times."""
    from qwen3vl_lab.apps.bench_kernels import CASES, WIDTH

    code, out, err = run_cli(capsys, "bench", "--model_dir", onnx_dir, "--kernels", "--runs", "1", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert [(k["bits"], k["block_size"]) for k in result["kernels"]] == list(CASES)
    assert result["n"] == WIDTH * result["k"] and result["probe_best_gb_s"] > 0
    for k in result["kernels"]:
        assert k["ms"] > 0 and k["gweights_s"] == pytest.approx(result["k"] * result["n"] / k["ms"] / 1e6)
        assert f"| {k['bits']}, {k['block_size']} | {k['ms']:.2f} |" in out
    assert "not 8x larger than the largest CPU cache" in out  # the tiny model's weights: said, not hidden


def test_bench_rejects_bad_input(onnx_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "qwen3vl_lab", "bench", "--model_dir", str(onnx_dir),
                          "--runs", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--runs" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "qwen3vl_lab", "bench", "--model_dir", str(onnx_dir),
                          "--vs", "genai"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--hf_dir" in out.stderr and "Traceback" not in out.stderr


def test_bench_never_replaces_a_genai_dir_of_the_users(onnx_dir, tiny_dir, tmp_path):
    """--genai_dir naming a folder of the user's without a genai_config.json: refused before the builder runs
    (it used to build for minutes, then delete the folder to put its export there)."""
    pytest.importorskip("onnxruntime_genai")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    out = subprocess.run([sys.executable, "-m", "qwen3vl_lab", "bench", "--model_dir", str(onnx_dir),
                          "--prompt_tokens", "8", "--new_tokens", "4", "--runs", "1", "--threads", "1",
                          "--image_size", "0", "--vs", "genai", "--hf_dir", str(tiny_dir), "--genai_dir", str(mine)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "notes.txt" in out.stderr and "--genai_dir" in out.stderr
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_bench_names_a_missing_package_as_the_cause(onnx_dir, tiny_dir, tmp_path):
    """genai's builder importing a package that is not installed: the line names the package and the extra,
    not the (correct) --hf_dir. A shadow `torch` that fails to import stands in for an uninstalled one."""
    pytest.importorskip("onnxruntime_genai")
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "qwen3vl_lab", "bench", "--model_dir", str(onnx_dir),
                          "--text_precision", "int4", "--runs", "1", "--new_tokens", "2", "--image_size", "0",
                          "--vs", "genai", "--hf_dir", str(tiny_dir), "--genai_dir", str(tmp_path / "genai")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert_one_line_error(out.returncode, out.stderr, "'torch'", "qwen3vl-lab[bench]")
    assert "pass --hf_dir" not in out.stderr
    assert not (tmp_path / "genai").exists()


def test_bench_extra_installs_what_the_builder_imports():
    """pyproject's [bench] extra lists every package BUILDER_PACKAGES needs beyond the base install, torch pinned."""
    import tomllib

    from qwen3vl_lab.apps.bench import BUILDER_PACKAGES

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {re.split(r"[<>=\[ ]", r)[0].lower().replace("-", "_") for r in reqs}  # noqa: E731
    assert set(BUILDER_PACKAGES) <= names(project["optional-dependencies"]["bench"]) | names(project["dependencies"])
    assert "torch==2.13.0" in project["optional-dependencies"]["bench"]


def test_fast_path_and_bench_do_not_import_torch():
    """torch is only loaded by the `--vs torch` worker process, never by the runtime or the bench itself."""
    code = ("import sys, qwen3vl_lab.fast, qwen3vl_lab.apps.bench, qwen3vl_lab.apps.bench_workers, "
            "qwen3vl_lab.export.decoder_fast; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
