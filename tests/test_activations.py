"""Per-channel activation statistics and the activation-weighted error (debug/activations.py), checked against
the ground truth of the outlier teaching model (export/outliers.py: outliers.json says which layers, MatMuls and
channels carry planted outliers) and against small hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_lab.debug.activations import (
    collect_channel_stats,
    format_channel_stats,
    format_weighted,
    int8_blocks,
    output_errors,
    weighted_errors,
)
from qwen3vl_lab.debug.weights import short_name
from qwen3vl_lab.export.outliers import read_planted
from qwen3vl_lab.export.quantize import Int4Recipe, quantize_folder
from qwen3vl_lab.shapes.calibration import calibration_prompts


@pytest.fixture(scope="module")
def stats(outliers_onnx_fp32_dir):
    return collect_channel_stats(outliers_onnx_fp32_dir, calibration_prompts(2))


@pytest.fixture(scope="module")
def int4_dir(outliers_onnx_fp32_dir, tmp_path_factory):
    """The outlier model at the default recipe (what `export --precision int4` writes)."""
    return quantize_folder(outliers_onnx_fp32_dir / "cpu-fp32", tmp_path_factory.mktemp("int4") / "cpu-int4", Int4Recipe(),
                           progress=False)


def test_int8_blocks_and_output_errors_by_hand():
    x = np.array([[100.0, 0.3, -0.2, 1.0, 2.0, 0.01]])  # block 3: [100, 0.3, -0.2] [1, 2, 0.01]
    q = int8_blocks(x, 3)
    assert q[0, 0] == pytest.approx(100.0) and q[0, 1] == 0.0 and q[0, 2] == 0.0  # crushed by the outlier's scale
    assert q[0, 4] == pytest.approx(2.0) and q[0, 3] == pytest.approx(round(127 / 2) * 2 / 127)
    x = np.array([[10.0, 1.0], [0.0, 1.0]])  # (rows 2, K 2)
    w = np.array([[1.0], [1.0]])  # (K 2, N 1)
    wq = np.array([[0.0], [1.0]])  # the first input channel's weight rounded away
    plain, weighted, kernel = output_errors(x, w, wq)
    assert plain == pytest.approx(np.sqrt(1 / 2))
    assert weighted == pytest.approx(np.sqrt(100 / (11 ** 2 + 1)))  # |X (W - Wq)| / |X W| = |(10, 0)| / |(11, 1)|
    assert kernel is None


def test_channel_stats_find_the_planted_channels(outliers_hf_dir, stats):
    planted = read_planted(outliers_hf_dir)
    by_weight = {s.weight: s for s in stats}
    assert len(stats) == 28  # 7 weight MatMuls per layer, 4 layers (lm_head left out)
    for site in planted.sites:
        for w in site.consumers:
            s = by_weight[w]
            assert s.tokens > 50 and s.absmax.shape == s.mean_abs.shape
            assert set(site.channels) <= set(s.outliers), (s.matmul, site.channels, s.outliers[:10])
            if site.kind != "down_in":  # the norm outputs have no other outliers: the planted ones, largest first
                assert set(s.outliers) == set(site.channels) and s.ratio > 200
    for s in stats:
        if s.matmul.endswith("o_proj"):
            assert s.outliers == () and s.ratio < 16
    table = format_channel_stats(stats)
    assert "layers.0.self_attn.q_proj" in table and "x)" in table


def test_weighted_error_singles_out_the_planted_matrices(outliers_hf_dir, outliers_onnx_fp32_dir, stats, int4_dir):
    planted = set(read_planted(outliers_hf_dir).consumers())
    errors = weighted_errors(outliers_onnx_fp32_dir, int4_dir, stats=stats)
    assert len(errors) == 28
    hit = [e for e in errors if any(short_name(w) == e.matmul for w in planted)]
    rest = [e for e in errors if e not in hit]
    assert len(hit) == 24 and len(rest) == 4  # every q/k/v, gate/up, down_proj; the o_projs are clean
    plain = [e.plain for e in errors]
    assert max(plain) < 2 * min(plain)  # the plain weight error cannot tell them apart ...
    assert min(e.weighted for e in hit) > 2 * max(e.weighted for e in rest)  # ... the output error can
    assert min(e.kernel for e in hit) > 10 * max(e.kernel for e in rest)  # and accuracy_level 4's int8 inputs more so
    assert "weighted" in format_weighted(errors)
