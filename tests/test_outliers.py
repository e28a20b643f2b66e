"""The outlier teaching model (export/outliers.py, `make-tiny --trained --outliers`): a planting that changes no fp32
answer, and whose default INT4 export loses the shapes task.

Function preservation is checked against transformers (the reference, not our export): the planted and the
shipped checkpoints give the same logits and the same greedy tokens; and through our fp32 export, the same answers
on held-out scenes. The break is measured with onnxruntime's own quantizer at the default recipe.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.checkpoint import Checkpoint
from qwen3vl_lab.export.outliers import OUTLIERS_FILE, OutlierPlan, plant_outliers, read_planted

PROMPT = "<|im_start|>user\nWhat colour is the circle?<|im_end|>\n<|im_start|>assistant\n"


def test_planting_rescales_only_the_recorded_channels_by_powers_of_two(shapes_hf_dir, outliers_hf_dir):
    planted = read_planted(outliers_hf_dir)
    assert {s.kind for s in planted.sites} == {"attn_in", "mlp_in", "down_in"}
    assert len({s.layer for s in planted.sites}) == 4  # every decoder layer of the shapes model
    ref, out = Checkpoint.open(shapes_hf_dir), Checkpoint.open(outliers_hf_dir)
    assert ref.names() == out.names() and {out.dtype(n) for n in out.names()} == {"BF16"}
    expected = {}
    for s in planted.sites:  # the record, applied by hand: the scaled entries x s, the consumers' input columns / s
        assert s.scale == 2 ** round(np.log2(s.scale)) and s.scale >= 16
        w = expected.setdefault(s.scaled, ref.get(s.scaled))
        w[list(s.channels)] *= s.scale
        for c in s.consumers:
            expected.setdefault(c, ref.get(c))[:, list(s.channels)] /= s.scale
    for name in ref.names():  # bit for bit: nothing else changed, and nothing was rounded
        assert np.array_equal(out.get(name), expected.get(name, ref.get(name))), name


def test_transformers_gives_the_same_logits_and_tokens(shapes_hf_dir, outliers_hf_dir, hf_model_factory):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shapes_hf_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    logits, tokens = [], []
    for folder in (shapes_hf_dir, outliers_hf_dir):
        model = hf_model_factory(folder)
        model.model.rope_deltas = None
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits[0].numpy())
            model.model.rope_deltas = None
            tokens.append(model.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist())
    assert tokens[0] == tokens[1]
    assert np.abs(logits[0] - logits[1]).max() <= 1e-4 * np.abs(logits[0]).max()


def test_make_tiny_outliers_cli_and_bad_input(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "make-tiny", "--trained", "--outliers", "--output_dir", tmp_path / "m")
    assert code == 0 and "outliers planted" in out
    record = json.loads((tmp_path / "m" / OUTLIERS_FILE).read_text())
    assert record["sites"] and record["plan"] == json.loads(json.dumps(read_planted(tmp_path / "m").to_json()))["plan"]
    code, _, err = run_cli(capsys, "make-tiny", "--outliers", "--output_dir", tmp_path / "x")
    assert_one_line_error(code, err, "--trained")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="layers"):
        plant_outliers(tmp_path / "m", tmp_path / "y", OutlierPlan(layers=(7,)))
    with pytest.raises(UserError, match="not empty"):
        plant_outliers(tmp_path / "m", tmp_path / "m")


def test_fp32_export_keeps_the_answers_and_default_int4_loses_them(shapes_onnx_fp32_dir, outliers_onnx_fp32_dir,
                                                                    tmp_path):
    from qwen3vl_lab.export.quantize import Int4Recipe
    from qwen3vl_lab.shapes.accuracy import recipe_accuracy

    ref = recipe_accuracy(shapes_onnx_fp32_dir, ["fp32"], n=8, out_dir=tmp_path / "a", progress=False)
    planted = recipe_accuracy(outliers_onnx_fp32_dir, ["fp32", Int4Recipe()], n=8, out_dir=tmp_path / "b",
                              progress=False)
    assert planted.rows[0].predictions == ref.rows[0].predictions  # fp32: the same answers, question for question
    assert planted.rows[0].accuracy("all") >= 0.8
    assert planted.rows[1].accuracy("all") < 0.3, planted.table()  # the default INT4 recipe breaks
