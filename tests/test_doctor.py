"""The INT4 doctor on tiny random checkpoints: fp32 vs itself is exactly zero, INT4 vs fp32 is measured and
non-zero, deliberately broken folders are caught by the checklist and by the comparison, and the recipe
sweep ranks a clearly worse recipe (2-bit) below a better one. With random weights both models' text is
meaningless: agreement with fp32 is what counts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from helpers import DecoderSessions
from onnx import numpy_helper

from qwen3vl_lab.apps.cli import main
from qwen3vl_lab.debug.breakage import make_broken
from qwen3vl_lab.debug.checklist import run_checklist
from qwen3vl_lab.debug.compare import compare, free_greedy, teacher_forced
from qwen3vl_lab.debug.doctor import diagnose
from qwen3vl_lab.debug.inputs import PromptSpec, prepare
from qwen3vl_lab.debug.layers import capture, compare_layers
from qwen3vl_lab.debug.sweep import sweep
from qwen3vl_lab.debug.weights import compare_weights
from qwen3vl_lab.export.quantize import Int4Recipe, quantize_folder
from qwen3vl_lab.model import load_model
from qwen3vl_lab.steps import prefill

TEXT = "Write a haiku about the sea."
N = 6  # generated steps compared per prompt
CHECKS = ("accuracy_level", "lm_head", "tied_embeddings", "qk_norm", "genai_config", "positions", "mrope", "deepstack",
          "kv_cache", "graph_opt", "eos", "generation_eos", "fp16_overflow")


@pytest.fixture(scope="module")
def root(tiny_onnx_dir):
    return tiny_onnx_dir  # shared across test files: never modified in place


@pytest.fixture(scope="module")
def fp32(root):
    return load_model(root, "fp32")


@pytest.fixture(scope="module")
def int4(root):
    return load_model(root, "int4")


@pytest.fixture(scope="module")
def image_prompt():
    """128x128 random image -> grid (1, 8, 8): 16 image tokens on a 4x4 H/W grid, with DeepStack."""
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)
    return PromptSpec("Describe the picture.", image=image, image_size=128)


@pytest.fixture(scope="module")
def broken(root, tmp_path_factory):
    base = tmp_path_factory.mktemp("broken")
    return lambda kind: load_model(make_broken(root / "cpu-fp32", base / kind, kind)) if not (base / kind).exists() \
        else load_model(base / kind)


# -- comparison ----------------------------------------------------------------------------------
def test_fp32_against_itself_is_exactly_zero(root, fp32, image_prompt):
    other = load_model(root, "fp32")  # separate sessions, same folder
    for prompt in (TEXT, image_prompt):
        tf = teacher_forced(fp32, other, prompt, N)
        assert len(tf.kl) == N
        assert tf.kl.max() == 0.0 and tf.top1_agree.all() and (tf.ref_rank == 0).all()
        assert free_greedy(fp32, other, prompt, N).first_divergence is None
    layers = compare_layers(fp32, other, image_prompt)
    assert len(layers.rows) == 3 * 4 + 2
    assert all(r.rel_error == 0.0 and r.sqnr_db == np.inf for r in layers.rows)


def test_int4_against_fp32_is_measured_and_nonzero(fp32, int4, image_prompt):
    cmp = compare(fp32, int4, [TEXT, image_prompt], N)
    assert len(cmp.forced) == 2 and all(len(f.kl) == N for f in cmp.forced)
    assert 1e-3 < cmp.mean_kl < 1.0  # INT4 on random weights: clearly non-zero, far from unrelated models
    assert np.isfinite(cmp.kl).all() and (cmp.kl > 0).all()
    # KL at step 0, recomputed here from both models' prefill logits with an independent formula
    p = prepare(fp32, TEXT)
    a = prefill(fp32, p.inputs_embeds, p.positions).logits[0].astype(np.float64)
    b = prefill(int4, p.inputs_embeds, p.positions).logits[0].astype(np.float64)
    pa, pb = np.exp(a - a.max()), np.exp(b - b.max())
    pa, pb = pa / pa.sum(), pb / pb.sum()
    assert abs(float(np.sum(pa * np.log(pa / pb))) - cmp.forced[0].kl[0]) < 1e-9
    assert cmp.forced[0].top1_agree[0] == (a.argmax() == b.argmax())
    # per layer: finite, positive SQNR, and the residual stream's error grows through the layers
    layers = compare_layers(fp32, int4, image_prompt)
    hidden = layers.series("hidden", "rel_error")
    assert np.isfinite(layers.series("hidden")).all() and (layers.series("hidden") > 0).all()
    assert 0 < hidden[0] < hidden[-1] < 1
    assert 0 < layers.row("logits").rel_error < 1
    # per weight: every matrix carries a 4-bit-sized error
    w = compare_weights(fp32, int4)
    assert len(w.rows) == 29 and ((w.rel_error > 0.02) & (w.rel_error < 0.2)).all()
    assert w.rows[0].block_rel_error.shape == (w.rows[0].shape[1], 2)  # (N, K / 32)


def test_teacher_forced_continuation_in_one_prefill_equals_the_cached_path(fp32):
    tf = teacher_forced(fp32, fp32, TEXT, 4)
    out = capture(fp32, TEXT, ["logits"], tokens=tf.tokens[:3])["logits"][0]  # (S + 3, V)
    assert (out[-4:].argmax(-1) == tf.tokens).all()


def test_layer_capture_writes_nothing(root, int4):
    before = sorted(p.name for p in (root / "cpu-int4").iterdir())
    capture(int4, TEXT)
    assert sorted(p.name for p in (root / "cpu-int4").iterdir()) == before


# -- checklist -----------------------------------------------------------------------------------
def test_checklist_passes_fp32_and_flags_the_int4_head(fp32, int4, root, tmp_path):
    # fp32: nothing quantized (recipe: skip) and no reference for the image probe (skip); the cache is consistent
    assert run_checklist(fp32).status() == {**{k: "pass" for k in CHECKS}, "algorithm": "skip", "image_probe": "skip"}
    cl = run_checklist(int4, reference=fp32)
    # the builder's own INT4 is not broken: no FAIL; the INT4 head is a named risk (WARN), measured elsewhere
    assert cl.failed == [] and [i.key for i in cl.warned] == ["lm_head"], cl.table()
    assert cl.item("image_probe").status == "pass" and "without DeepStack" in cl.item("image_probe").evidence
    assert "bits 4" in cl.item("lm_head").evidence and "on fp32's 16-token answer" in cl.item("accuracy_level").evidence
    assert "quantization noise at the same positions" in cl.item("kv_cache").evidence
    int8_head = quantize_folder(root / "cpu-fp32", tmp_path / "int8-head", Int4Recipe(lm_head="int8"), progress=False)
    cl = run_checklist(int8_head, reference=fp32)
    assert cl.passed and cl.warned == [], cl.table()


@pytest.mark.parametrize("kind,keys", [("no_qk_norm", ["qk_norm"]), ("no_deepstack", ["deepstack"]),
                                       ("positions_1d", ["positions"]), ("eos_missing", ["eos"]),
                                       ("wrong_type", ["genai_config"])])
def test_checklist_flags_each_broken_variant(broken, kind, keys):
    """Each broken copy fails its own line and no other: 1-D positions are the positions line's, so the MRoPE
    layout line skips (nothing to read the layout from) instead of blaming it twice."""
    cl = run_checklist(broken(kind))
    assert [i.key for i in cl.failed] == keys, cl.table()
    assert cl.warned == [], cl.table()
    if kind == "positions_1d":
        assert cl.item("mrope").status == "skip"


def test_comparison_flags_broken_graphs(fp32, broken, image_prompt):
    def kl(model, prompt):
        return compare(fp32, model, [prompt], N, free=False).mean_kl

    assert kl(broken("no_qk_norm"), TEXT) > 1e-2
    # DeepStack and the H/W position rows only matter when there is an image: exactly zero on text
    for kind in ("no_deepstack", "positions_1d"):
        model = broken(kind)
        assert kl(model, TEXT) == 0.0
        assert kl(model, image_prompt) > 1e-4, kind


def massive_activation_copy(src, dst, scale: float = 1000.0):
    """An fp32 folder computing the same function with Qwen3-style massive activations: channel 5 of every
    norm weight x scale, row 5 of the weights reading that norm / scale (an exact rewrite in real numbers)."""
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model.onnx"):
            shutil.copy2(f, dst / f.name)
    m = onnx.load(str(src / "model.onnx"))  # tiny: 40 MB with its weights
    inits = {t.name: t for t in m.graph.initializer}

    def rescale(name, factor):
        w = numpy_helper.to_array(inits[name]).copy()
        w[5] *= factor  # norm weight (H,) or MatMul weight (in, out): input channel 5
        inits[name].CopyFrom(numpy_helper.from_array(w, name))

    for i in range(4):
        p = f"model.language_model.layers.{i}."
        for norm, users in (("input_layernorm", ("q_proj", "k_proj", "v_proj")), ("post_attention_layernorm", ("gate_proj", "up_proj"))):
            rescale(f"{p}{norm}.weight", scale)
            for u in users:
                rescale(f"{p}{'self_attn' if u[0] in 'qkv' else 'mlp'}.{u}.weight", 1.0 / scale)
    onnx.save_model(m, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst


def test_accuracy_level_4_fails_on_massive_activations(root, fp32, tmp_path):
    heavy = load_model(massive_activation_copy(root / "cpu-fp32", tmp_path / "heavy"))
    assert compare(fp32, heavy, [TEXT], 3, free=False).mean_kl < 1e-9  # the same function in fp32
    acc4 = quantize_folder(heavy.folder, tmp_path / "acc4", Int4Recipe(lm_head="fp32"), progress=False)
    acc0 = quantize_folder(heavy.folder, tmp_path / "acc0", Int4Recipe(lm_head="fp32", accuracy_level=0), progress=False)
    item = run_checklist(acc4, reference=heavy).item("accuracy_level")
    assert item.status == "fail" and "level 4 changes" in item.evidence, item.evidence
    assert run_checklist(acc0, reference=heavy).item("accuracy_level").status == "pass"
    # and the comparison measures what the checklist predicts: level 4 drifts further from fp32
    assert compare(heavy, acc4, [TEXT], N, free=False).mean_kl > 2 * compare(heavy, acc0, [TEXT], N, free=False).mean_kl
    # without a reference the outlier measure alone decides
    assert run_checklist(acc4).item("accuracy_level").status == "fail"
    assert run_checklist(root / "cpu-int4").item("accuracy_level").status == "pass"


# -- sweep and CLI -------------------------------------------------------------------------------
def test_sweep_ranks_two_bit_below_int4(root, tmp_path):
    recipes = [Int4Recipe(bits=2), Int4Recipe(lm_head="fp32"), Int4Recipe(block_size=256, symmetric=False)]
    result = sweep(root, recipes, [TEXT], out_dir=tmp_path / "sweep", n_steps=N, progress=False)
    assert len(result.rows) == 3 and list(result.mean_kl) == sorted(result.mean_kl)
    assert result.rank_of(Int4Recipe(bits=2)) == 2
    assert result.mean_kl[-1] > 3 * result.mean_kl[0]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["recipe"]["name"] for r in saved["rows"]] == result.names


def test_doctor_cli_prints_and_writes_figures(root, tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), np.uint8)).save(img)
    report = tmp_path / "report"
    code = main(["doctor", "--model_dir", str(root), "--prompt", "Hello", "--image", str(img), "--image_size", "64",
                 "--n_steps", "3", "--report_dir", str(report), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for needle in ("checklist for", "[WARN] int4 lm_head", "teacher forced", "[image] Hello", "layer errors",
                   "weights:", "activation-weighted error", "findings:"):
        assert needle in out, needle
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert {"kl_per_step.png", "sqnr_per_layer.png", "weight_error.png"} <= set(pngs)
    assert all((report / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_doctor_holds_one_decoder_at_a_time(root, image_prompt):
    """The reference runs and is released before the test model loads (and each one's tapped copy opens
    after its plain decoder closed): no two folders' decoders are ever open together."""
    with DecoderSessions() as sessions:
        report = diagnose(root, "int4", prompts=[TEXT], image=image_prompt.image, image_size=128, n_steps=3)
    assert {root.resolve() / "cpu-fp32/model.onnx.data", root.resolve() / "cpu-int4/model.onnx.data"} <= set(sessions.opened)
    assert sessions.overlaps == []
    assert report.comparison.forced[0].agreement > 0 and report.layers.rows  # it did compare the two
    assert report.checklist.item("image_probe").status == "pass"  # ours: the probe ran through our fp32


def test_recorded_vision_replays_the_vision_graph_and_refuses_an_unseen_image(fp32, image_prompt):
    from qwen3vl_lab.debug.record import RecordedVision
    from qwen3vl_lab.errors import UserError

    direct = prepare(fp32, image_prompt)
    model = load_model(fp32.root, "fp32")
    recorded = RecordedVision(model.vision)
    model.use_vision(recorded, model.config.vision, model.folder)
    prepare(model, image_prompt)
    recorded.close()
    replayed = prepare(model, image_prompt)  # from the record alone
    assert np.array_equal(replayed.inputs_embeds, direct.inputs_embeds)
    assert np.array_equal(replayed.deepstack, direct.deepstack)
    other = PromptSpec("Describe the picture.", image=np.zeros((128, 128, 3), np.uint8), image_size=128)
    with pytest.raises(UserError, match="not encoded while the vision graph was loaded"):
        prepare(model, other)


def test_the_session_tracker_sees_two_decoders_held_together(root):
    """The check above can fail: both folders loaded at once is an overlap."""
    with DecoderSessions() as sessions:
        a, b = load_model(root, "fp32"), load_model(root, "int4")
    assert sessions.overlaps == [(root.resolve() / "cpu-int4/model.onnx.data", [root.resolve() / "cpu-fp32/model.onnx.data"])]
    del a, b


def test_sweep_cli(root, tmp_path, capsys):
    names = ["default-2bit-b32-sym-acc4-head_int4", "default-b32-sym-acc4-head_fp32", "rtn-b32-asym-acc0-head_int8"]
    links = (root / "cpu-fp32" / "qwen3vl-embedding.onnx.data").stat().st_nlink  # 2: cpu-int4 shares it
    code = main(["sweep", "--model_dir", str(root), "--prompt", "Hello", "--n_steps", "3", "--recipes", *names,
                 "--out_dir", str(tmp_path / "v"), "--report_dir", str(tmp_path / "r"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [ln for ln in out.splitlines() if ln[:2].strip().isdigit()]
    assert len(lines) == 3 and names[0] in lines[-1]  # the 2-bit control ranks last
    assert (tmp_path / "r" / "sweep.png").is_file()
    assert sorted(p.name for p in (tmp_path / "v").iterdir() if not p.name.startswith(".")) == sorted(names + ["sweep.json"])
    # the variants share a private copy: the export's files get no more links
    assert (root / "cpu-fp32" / "qwen3vl-embedding.onnx.data").stat().st_nlink == links
    code = main(["sweep", "--model_dir", str(root), "--recipes", "int4-b32"])
    assert code == 2 and "recipe name" in capsys.readouterr().err


def test_doctor_bad_input_is_one_line(root, capsys):
    code = main(["doctor", "--model_dir", str(root), "--image", "/nonexistent.png"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--image" in err
