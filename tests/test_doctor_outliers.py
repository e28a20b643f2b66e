"""The doctor on the outlier teaching model (make-tiny --trained --outliers) at the default INT4 recipe: it names the
cause and only the cause — the accuracy_level line FAILs on the planted channels, the KV cache is not blamed, nothing
structural fails, and what to do points at `qwen3vl-lab repair`, never at a re-export or an 8-bit head."""

from __future__ import annotations

import pytest

from qwen3vl_lab.debug.doctor import diagnose
from qwen3vl_lab.export.outliers import read_planted

TEXT = "What colour is the circle?"


@pytest.fixture(scope="module")
def outliers_onnx_dir(outliers_hf_dir, tmp_path_factory):
    from qwen3vl_lab.export.exporter import export

    out = tmp_path_factory.mktemp("outliers-int4") / "onnx"
    export(outliers_hf_dir, out, ["fp32", "int4"], progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def report(outliers_onnx_dir):
    return diagnose(outliers_onnx_dir, "int4", prompts=[TEXT], n_steps=6)


def test_the_doctor_fails_only_what_is_broken(report):
    status = report.checklist.status()
    assert [i.key for i in report.checklist.failed] == ["accuracy_level"], report.checklist.table()
    assert status["kv_cache"] == "pass", report.checklist.item("kv_cache").evidence  # no false alarm
    assert status["fp16_overflow"] == "warn" and status["lm_head"] == "warn"
    assert report.comparison.agreement < 0.9  # it is broken: INT4 parts from fp32


def test_what_to_do_points_at_repair_and_nothing_that_does_not_help(report, outliers_onnx_dir):
    text = "\n".join(report.advice)
    assert f"qwen3vl-lab repair --model_dir {outliers_onnx_dir} --output_dir FIXED" in text, text
    assert "make a correct export" not in text and "--lm_head int8" not in text, text
    assert "what to do:" in report.render()


def test_the_report_names_the_planted_layers_and_channels(report, outliers_hf_dir):
    """outliers.json (written by the planting) is the ground truth: every consumer of a planted site has the planted
    channels among its input's outliers, and the report prints them."""
    planted = read_planted(outliers_hf_dir)
    stats = {c.weight: c for c in report.channels}
    for site in planted.sites:
        for weight in site.consumers:
            assert set(site.channels) <= set(stats[weight].outliers), (weight, site.channels, stats[weight].outliers)
    text = report.render()
    assert "activation outliers per MatMul input" in text and "activation-weighted error" in text
    down = next(s for s in planted.sites if s.kind == "down_in" and s.layer == 0)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("layers.0.mlp.down_proj") and "channels" in ln)
    assert any(f" {k} (" in line for k in down.channels), line


def test_the_weighted_error_makes_the_broken_matrices_stand_out(report):
    """The plain weight error is about the same for every matrix; weighted by the real inputs, the MatMuls whose
    inputs carry the outliers move their outputs several times more than the rest."""
    rows = {e.matmul: e for e in report.weighted}
    down = [e for m, e in rows.items() if m.endswith("down_proj")]
    clean = [e for m, e in rows.items() if m.endswith("o_proj")]
    assert max(e.plain for e in down) < 2 * min(e.plain for e in clean)  # the plain table cannot see it
    assert min(e.weighted / e.plain for e in down) > 2.5 > max(e.weighted / e.plain for e in clean)


def test_the_accuracy_level_line_names_a_planted_input(report, outliers_hf_dir):
    planted = read_planted(outliers_hf_dir)
    layers = {s.layer for s in planted.sites}
    item = report.checklist.item("accuracy_level")
    assert item.measured["channel_ratio"] >= 1000  # the planted scales are 1024 and 4096
    assert any(f"layers.{i}/" in item.measured["node"] for i in layers), item.measured
