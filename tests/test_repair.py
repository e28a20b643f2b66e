"""`repair` (debug/repair.py): equalisation keeps fp32, sensitivity finds the planted MatMuls, repair brings the
outlier model's INT4 back within 3 points of fp32 with >= 90% of the decoder layers' MatMuls at 4 bits, does not
make the unplanted model worse, writes an export that loads and generates; bad input is one line.

Held-out accuracy is scored on a few scenes only (the full candidate table, measured on 20 scenes, is in
docs/guides/repair.md with its command); the budget asserted is the one the command applies."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli

from qwen3vl_lab.debug.activations import collect_channel_stats
from qwen3vl_lab.debug.repair import (
    REPAIR_FILE,
    CandidateResult,
    Sensitivity,
    base_candidates,
    equalisation_scales,
    equalised_folder,
    mixed_candidates,
    pick_winner,
    repair,
    sensitivity,
)
from qwen3vl_lab.debug.weights import short_name
from qwen3vl_lab.export.outliers import read_planted
from qwen3vl_lab.export.quantize import Int4Recipe, quantize_folder
from qwen3vl_lab.model import load_model
from qwen3vl_lab.shapes.calibration import calibration_prompts, heldout_scorer
from qwen3vl_lab.taps import run_with_cache

N_SCENES = 6


@pytest.fixture(scope="module")
def prompts():
    return calibration_prompts(2)


def test_equalisation_leaves_fp32_bit_for_bit_and_lowers_the_int4_error(outliers_onnx_fp32_dir, prompts, tmp_path):
    fp32 = outliers_onnx_fp32_dir / "cpu-fp32"
    stats = collect_channel_stats(fp32, prompts)
    sites = equalisation_scales(fp32, stats, Int4Recipe())
    assert len(sites) == 12  # attn_in, mlp_in, down_in in each of 4 layers
    for s in sites:
        assert np.array_equal(s.scales, np.exp2(np.round(np.log2(s.scales))))  # powers of two only
        assert s.error_after < 0.5 * s.error_before, (s.layer, s.kind, s.error_before, s.error_after)
    out = equalised_folder(fp32, tmp_path / "eq", sites)
    logits = []
    for folder in (fp32, out):
        model = load_model(folder, "fp32")
        logits.append(run_with_cache(model, "What colour is the circle?", [])[0])
    assert np.array_equal(logits[0], logits[1])  # the same numbers, not just close ones


def test_sensitivity_ranks_the_planted_matmuls_first(outliers_hf_dir, outliers_onnx_fp32_dir, prompts, tmp_path):
    int4 = quantize_folder(outliers_onnx_fp32_dir / "cpu-fp32", tmp_path / "cpu-int4", Int4Recipe(), progress=False)
    shutil.copytree(outliers_onnx_fp32_dir / "pytorch", tmp_path / "pytorch")  # the checkpoint's image settings
    rows = sensitivity(int4, outliers_onnx_fp32_dir, prompts[:2], n_steps=6)
    assert len(rows) == 28 and all(isinstance(r, Sensitivity) for r in rows)
    planted = {short_name(w) for w in read_planted(outliers_hf_dir).consumers()}
    assert rows[0].matmul in planted and rows[0].recovered > 0
    assert [r.mean_kl for r in rows] == sorted(r.mean_kl for r in rows)


def test_mixed_precision_stays_within_the_four_bit_budget():
    ranked = [Sensitivity(f"layers.{i}.mlp.down_proj", f"w{i}", 0.1 * i, 0.9, 0.5 - 0.1 * i) for i in range(4)]
    mixed = mixed_candidates(ranked, 28, 0.9)
    assert [c.name for c in mixed] == ["mixed_8bit", "mixed_fp32"]
    assert [w for w, _ in mixed[0].bits_for] == ["w0", "w1"]  # floor(28 x 10%) = 2 MatMuls, the most sensitive
    assert {b for _, b in mixed[1].bits_for} == {None}


def test_the_winner_rule():
    d = base_candidates()
    rows = [CandidateResult(d[0], correct=20, total=100, decoder_bytes=10, four_bit=(28, 28), mean_kl=1.0),
            CandidateResult(d[3], correct=89, total=100, decoder_bytes=10, four_bit=(28, 28), mean_kl=0.01),
            CandidateResult(d[5], correct=90, total=100, decoder_bytes=20, four_bit=(0, 28), mean_kl=0.0)]
    winner, ok = pick_winner(rows, 0.9)
    assert winner.name == "equalised" and ok  # int8 scores best but keeps no MatMul at 4 bits
    winner, ok = pick_winner(rows[:1], 0.9)
    assert winner.name == "default" and not ok  # nothing within budget: the best one, said so


def test_repair_brings_the_outlier_model_back(outliers_onnx_fp32_dir, prompts, tmp_path):
    report = repair(outliers_onnx_fp32_dir, tmp_path / "fixed", prompts, scorer=heldout_scorer(N_SCENES),
                    candidates=["default", "equalised"], log=lambda _: None)
    fp32 = report.fp32_accuracy
    assert report.row("default").accuracy < 0.3  # what `export --precision int4` gives
    winner = report.row(report.winner)
    assert report.within_budget and winner.candidate.equalised
    assert winner.accuracy >= fp32 - 0.03 and winner.four_bit_share >= 0.9
    assert "winner" in report.summary() and "equalised" in report.table()
    record = json.loads((tmp_path / "fixed" / REPAIR_FILE).read_text())
    assert record["winner"] == report.winner and len(record["candidates"]) == 2
    model = load_model(tmp_path / "fixed", "int4")  # a normal export: cpu-int4 beside cpu-fp32
    assert model.precision == "int4" and (tmp_path / "fixed" / "cpu-fp32" / "model.onnx").is_file()
    assert heldout_scorer(2)(model.folder)["correct"] >= 8  # it answers (2 scenes, 11 questions)


def test_repair_does_not_make_the_unplanted_model_worse(shapes_onnx_fp32_dir, prompts, tmp_path):
    report = repair(shapes_onnx_fp32_dir, tmp_path / "fixed", prompts, scorer=heldout_scorer(N_SCENES),
                    candidates=["default", "equalised"], log=lambda _: None)
    assert report.row(report.winner).accuracy >= report.row("default").accuracy
    assert report.within_budget


@pytest.mark.parametrize("argv, needle", [
    (["--model_dir", "{tmp}/nothing", "--output_dir", "{tmp}/o"], "--model_dir"),
    (["--model_dir", "{model}", "--output_dir", "{model}/cpu-fp32"], "--output_dir"),
    (["--model_dir", "{model}", "--output_dir", "{tmp}/o", "--candidates", "magic"], "unknown candidate"),
    (["--model_dir", "{model}", "--output_dir", "{tmp}/o", "--shapes", "2", "--prompt", "hi"], "--shapes"),
    (["--model_dir", "{model}", "--output_dir", "{tmp}/o", "--min_four_bit", "2"], "--min_four_bit"),
])
def test_repair_bad_input_is_one_line(shapes_onnx_fp32_dir, tmp_path, capsys, argv, needle):
    argv = [a.format(tmp=tmp_path, model=shapes_onnx_fp32_dir) for a in argv]
    code, _, err = run_cli(capsys, "repair", *argv)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_plot_repair_draws_each_candidate_at_its_accuracy_with_its_interval():
    from qwen3vl_lab.debug.repair import Candidate, CandidateResult, RepairReport
    from qwen3vl_lab.stats import wilson_interval
    from qwen3vl_lab.viz.doctor import plot_repair

    def row(name, correct, mb):
        return CandidateResult(Candidate(name, Int4Recipe()), correct=correct, total=22, decoder_bytes=int(mb * 1e6),
                               decode_tok_s=100.0, four_bit=(28, 28))
    rows = [row("default", 0, 12.0), row("equalised", 20, 12.0), row("int8", 0, 21.6)]
    report = RepairReport("m", "o", rows, winner="equalised", within_budget=True, rule="", fp32_correct=20, fp32_total=22)
    ax = plot_repair(report).axes[0]
    points = sorted((line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines if line.get_marker() == "o")
    assert points == [(12.0, 0.0), (12.0, pytest.approx(20 / 22)), (21.6, 0.0)]
    low, high = wilson_interval(20, 22)
    spans = sorted(tuple(seg[:, 1]) for coll in ax.collections for seg in coll.get_segments())
    assert any(a == pytest.approx(low) and b == pytest.approx(high) for a, b in spans)  # the winner's 95% interval
    assert "equalised" in ax.get_title()
