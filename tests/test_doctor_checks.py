"""The checklist's lines from public bug reports, each passing on a correct export and failing on a crafted broken
one, and the KV-cache line that must not blame the wiring for a quantized model's own noise.

    graph_opt       a QDQ INT4 decoder (DequantizeLinear + MatMul) that onnxruntime fuses into int8-activation
                    MatMulNBits at ORT_ENABLE_ALL, on a model with outlier channels: the answer changes
    mrope           our decoder with Qwen2.5-VL's blocked MRoPE table: text answers unchanged, image answers not
    generation_eos  a checkpoint whose generation_config.json lists an end-of-sequence id the export ignores
    fp16_overflow   outlier channels above 65504: a WARN on the fp32 decoder, a FAIL on its fp16 conversion
    kv_cache        outlier INT4 at accuracy_level 4: cached and recomputed differ (decode and prefill kernels),
                    the wiring is right: PASS; a decoder with swapped layer caches: FAIL, fp32 and INT4
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_doctor import TEXT, massive_activation_copy

from qwen3vl_lab.debug import export_checks
from qwen3vl_lab.debug.checklist import activation_peaks, check_fp16_overflow, check_generation_eos
from qwen3vl_lab.debug.compare import compare
from qwen3vl_lab.debug.export_checks import (
    answer_logits,
    answer_probe,
    blocked_inv_freq_by_axis,
    check_graph_optimizations,
    check_kv_cache,
    check_mrope_layout,
)
from qwen3vl_lab.debug.inputs import PromptSpec
from qwen3vl_lab.export.quantize import Int4Recipe, quantize_folder
from qwen3vl_lab.layout import DECODER_FILE
from qwen3vl_lab.model import load_model
from qwen3vl_lab.rope import mrope_inv_freq_by_axis


@pytest.fixture(scope="module")
def root(tiny_onnx_dir):
    return tiny_onnx_dir  # shared: never modified in place


@pytest.fixture(scope="module")
def heavy(root, tmp_path_factory):
    """The tiny fp32 decoder with a channel 1024x the others at every norm output (function-preserving in fp32)."""
    return massive_activation_copy(root / "cpu-fp32", tmp_path_factory.mktemp("heavy") / "fp32", scale=1024.0)


# -- crafted broken exports ------------------------------------------------------------------------
def blocked_mrope_copy(root, dst):
    """Our export whose rotary table gives the T/H/W channels in Qwen2.5-VL's blocked sections."""
    shutil.copytree(root, dst)
    path = dst / "cpu-fp32" / DECODER_FILE
    graph = onnx.load(str(path), load_external_data=False)
    text = load_model(root, "fp32").config.text
    want = mrope_inv_freq_by_axis(text)[:, None, None, :]  # (3, 1, 1, hd/2) what build_mrope bakes in
    table = next(t for t in graph.graph.initializer if tuple(t.dims) == want.shape
                 and np.allclose(numpy_helper.to_array(t), want))
    table.CopyFrom(numpy_helper.from_array(blocked_inv_freq_by_axis(text)[:, None, None, :].astype(np.float32), table.name))
    onnx.save(graph, str(path))
    return dst


def qdq_int4_copy(src, dst, block: int = 32):
    """An fp32 folder whose decoder layers' MatMuls read DequantizeLinear(int4 weight, scale per `block` rows):
    the QDQ INT4 format other quantizers write. Evaluated as written, it is the dequantized weights' exact product."""
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model.onnx"):
            shutil.copy2(f, dst / f.name)
    m = onnx.load(str(src / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and ".layers." in n.input[1]:
            w = numpy_helper.to_array(inits[n.input[1]])  # (K, N)
            K, N = w.shape
            scale = np.abs(w.reshape(K // block, block, N)).max(axis=1) / 7.0  # (K / block, N)
            q = np.clip(np.round(w / np.repeat(scale, block, axis=0)), -8, 7).astype(np.int8).ravel()
            nibbles = (q & 0x0F).astype(np.uint8)
            packed = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()  # two int4 per byte, low nibble first
            m.graph.initializer.extend([helper.make_tensor(f"{n.input[1]}.q4", TensorProto.INT4, [K, N], packed, raw=True),
                                        numpy_helper.from_array(scale.astype(np.float32), f"{n.input[1]}.scale")])
            nodes.append(helper.make_node("DequantizeLinear", [f"{n.input[1]}.q4", f"{n.input[1]}.scale"],
                                          [f"{n.input[1]}.dq"], axis=0, block_size=block))
            n.input[1] = f"{n.input[1]}.dq"
        nodes.append(n)
    m.graph.ClearField("node")
    m.graph.node.extend(nodes)
    used = {x for n in m.graph.node for x in n.input}
    kept = [t for t in m.graph.initializer if t.name in used]
    m.graph.ClearField("initializer")
    m.graph.initializer.extend(kept)
    next(o for o in m.opset_import if o.domain in ("", "ai.onnx")).version = 21  # int4 DequantizeLinear
    onnx.save_model(m, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst


def fp16_copy(src, dst):
    """An fp32 folder converted to compute in float16 (inputs and outputs kept fp32), as fp16 exports do."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model.onnx"):
            shutil.copy2(f, dst / f.name)
    m = convert_float_to_float16(onnx.load(str(src / "model.onnx")), keep_io_types=True)
    onnx.save_model(m, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst


# -- graph optimizations -----------------------------------------------------------------------------
def test_graph_optimizations_change_a_fused_qdq_decoder(root, heavy, tmp_path):
    assert check_graph_optimizations(load_model(root, "int4")).status == "pass"
    qdq = load_model(qdq_int4_copy(heavy, tmp_path / "qdq"))
    item = check_graph_optimizations(qdq)
    assert item.status == "fail" and "ORT_ENABLE_ALL vs ORT_DISABLE_ALL" in item.evidence, item.evidence
    # what the line says is so: at ORT_DISABLE_ALL the QDQ decoder is close to fp32, fused it is not
    probe = answer_probe(load_model(heavy))
    assert (answer_logits(qdq, probe).argmax(-1) == probe.tokens).mean() < 0.75


# -- MRoPE layout ------------------------------------------------------------------------------------
def test_blocked_mrope_passes_text_and_fails_the_image_probe(root, tmp_path):
    fp32 = load_model(root, "fp32")
    assert check_mrope_layout(fp32).status == "pass"
    blocked = load_model(blocked_mrope_copy(root, tmp_path / "blocked"), "fp32")
    item = check_mrope_layout(blocked)
    assert item.status == "fail" and item.evidence.endswith("blocked"), item.evidence
    # invisible on text (t = h = w: every channel sees the same position), it changes an image prompt's answer
    image = PromptSpec("Describe the picture.", image=np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8),
                       image_size=128)
    assert compare(fp32, blocked, [TEXT], 3, free=False).mean_kl == 0.0
    assert compare(fp32, blocked, [image], 3, free=False).mean_kl > 1e-4


# -- generation_config.json eos ids ------------------------------------------------------------------
def test_generation_config_eos_ids_must_all_stop_generation(root, tmp_path):
    assert check_generation_eos(load_model(root, "int4")).status == "pass"
    copy = tmp_path / "extra-eos"
    shutil.copytree(root, copy)
    path = copy / "pytorch" / "generation_config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = [151645, 151643, 151644]  # a checkpoint that also ends on a third id
    path.write_text(json.dumps(config))
    item = check_generation_eos(load_model(copy, "int4"))
    assert item.status == "fail" and "the runtime ignores [151644]" in item.evidence and \
        "genai_config.json ignores [151644]" in item.evidence, item.evidence


# -- fp16 overflow -----------------------------------------------------------------------------------
def test_fp16_overflow_warns_on_fp32_and_fails_on_an_fp16_decoder(root, tmp_path):
    fp32 = load_model(root, "fp32")
    assert check_fp16_overflow(fp32, fp32.graph()).status == "pass"
    big = load_model(massive_activation_copy(root / "cpu-fp32", tmp_path / "big", scale=2.0 ** 20))
    peaks = activation_peaks(big, source="the fp32 reference")
    assert peaks.peak[1] > 65504
    item = check_fp16_overflow(big, big.graph(), peaks)
    assert item.status == "warn" and "computes in float32" in item.evidence, item.evidence
    half = load_model(fp16_copy(big.folder, tmp_path / "fp16"))
    item = check_fp16_overflow(half, half.graph(), peaks)
    assert item.status == "fail" and "computes in float16" in item.evidence, item.evidence
    # what the line predicts happens: the fp16 decoder no longer gives fp32's answer
    probe = answer_probe(big)
    logits = answer_logits(half, probe)
    assert not np.isfinite(logits).all() or (logits.argmax(-1) == probe.tokens).mean() < 1.0


# -- KV cache: no false alarm, and a corrupt cache still fails ----------------------------------------
def swap_layer_caches(root, dst, precision: str = "fp32"):
    """A copy of the export whose decoder returns layer 1's keys as layer 0's and the other way round."""
    shutil.copytree(root, dst)
    path = dst / f"cpu-{precision}" / DECODER_FILE
    graph = onnx.load(str(path), load_external_data=False)
    swap = {"present.0.key": "present.1.key", "present.1.key": "present.0.key"}
    for node in graph.graph.node:
        node.output[:] = [swap.get(o, o) for o in node.output]
        node.input[:] = [swap.get(i, i) for i in node.input]
    onnx.save(graph, str(path))
    return dst


def test_kv_cache_gap_of_level_4_kernels_is_cleared_at_level_0(root, monkeypatch):
    """Whatever this CPU's kernels do: a level-4 graph whose cached decode misses the tolerance is rerun at level 0,
    and passes when the same graph there agrees (a wiring fault would miss at both levels)."""
    acc4 = load_model(root, "int4")  # the tiny export's INT4 graph: accuracy_level 4
    probe = answer_probe(acc4, keep_logits=False)
    level0 = export_checks.accuracy_level_decoder(acc4, 0)
    gaps = {"level 4": (np.array([0.5]), 0.9, 3.0), "level 0": (np.array([0.0]), 1.0, 0.0)}

    def gap(model, probe_, decoder=None):  # the measured gaps, as two kernels that round apart would give them
        kl, agree, diff = gaps["level 0" if decoder is not None else "level 4"]
        return kl, agree, diff, None

    monkeypatch.setattr(export_checks, "accuracy_level_decoder", lambda model, level: level0)
    monkeypatch.setattr(export_checks, "_cache_gap", gap)
    item = check_kv_cache(acc4, probe)
    assert item.status == "pass" and "accuracy_level 0" in item.evidence and "wired right" in item.evidence
    gaps["level 0"] = gaps["level 4"]  # a wiring fault: the same gap at both levels
    assert check_kv_cache(acc4, probe).status == "fail"


def test_kv_cache_is_judged_against_the_models_own_noise(root, heavy, tmp_path):
    acc4 = load_model(quantize_folder(heavy, tmp_path / "acc4", Int4Recipe(lm_head="fp32"), progress=False))
    probe = answer_probe(load_model(heavy))  # fp32's answer and logits
    with_ref, alone = check_kv_cache(acc4, probe), check_kv_cache(acc4)
    assert with_ref.status == "pass" and "quantization noise" in with_ref.evidence, with_ref.evidence
    assert alone.status == "pass", alone.evidence
    gap = float(alone.evidence.split("max KL ")[1].split(" ")[0])
    if "accuracy_level 0" in alone.evidence:  # this CPU's level-4 kernels round a decode row and a prefill apart:
        assert gap > 1e-2  # the old fixed tolerance would have blamed the wiring; the level-0 rerun cleared it
    else:  # this CPU's (e.g. AVX-512 VNNI) decode and prefill kernels agree: nothing for a rerun to explain
        assert gap <= export_checks.KV_KL_TOL
    corrupt = load_model(swap_layer_caches(root, tmp_path / "corrupt", "int4"), "int4")
    fp32_probe = answer_probe(load_model(root, "fp32"))
    for item in (check_kv_cache(corrupt, fp32_probe), check_kv_cache(corrupt)):
        assert item.status == "fail" and "fix the KV wiring" in item.fix, item.evidence
