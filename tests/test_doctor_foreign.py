"""The doctor on exports other tools made, and the checks that measure what an export has.

On the original guide's export (no position_ids, no DeepStack, model.type edited to qwen3) the doctor
builds our fp32 export of the checkpoint the guide ships in pytorch/ (into the cache, never into the
user's folder), names every missing piece with evidence, shows that text runs as the checkpoint does
while an image prompt does not, and ends with what to do. The KV-cache check fails on a decoder whose
cache is deliberately corrupted, and passes on a correct one.
"""

from __future__ import annotations

import pytest
from helpers import DecoderSessions, grace_hopper, run_cli
from test_doctor_checks import swap_layer_caches

from qwen3vl_lab.debug.doctor import diagnose
from qwen3vl_lab.debug.export_checks import check_kv_cache
from qwen3vl_lab.model import load_model

pytest.importorskip("onnxruntime_genai", reason="the guide's export is built with onnxruntime-genai's builder")


@pytest.fixture(scope="module")
def guide_report(guide_export_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3VL_LAB_CACHE", str(cache))
        before = sorted(p.relative_to(guide_export_dir) for p in guide_export_dir.rglob("*"))
        with DecoderSessions() as sessions:
            report = diagnose(guide_export_dir, "int4", prompts=["Write a haiku about the sea."], image=grace_hopper(),
                              image_size=64, n_steps=6)
        assert sorted(p.relative_to(guide_export_dir) for p in guide_export_dir.rglob("*")) == before
    return report, cache, sessions


def test_doctor_names_what_the_guide_export_lacks(guide_report):
    report, cache, _ = guide_report
    status = report.checklist.status()
    assert status["positions"] == "fail" and status["deepstack"] == "fail" and status["image_probe"] == "fail"
    assert status["genai_config"] == "fail" and "'qwen3'" in report.checklist.item("genai_config").evidence
    assert status["lm_head"] == "warn"  # the guide quantizes the head too: a named risk, not a measured fault
    assert status["kv_cache"] == "pass"
    probe = report.checklist.item("image_probe").evidence
    assert "1-D positions" in probe and "without DeepStack" in probe
    assert any((cache / "reference").iterdir())  # our export of pytorch/ was built in the cache


def test_doctor_separates_the_exports_error_from_quantization(guide_report):
    report, _, _ = guide_report
    text, image = report.export_comparison.forced  # their fp32 vs our export of the same checkpoint
    assert text.agreement == 1.0 and text.mean_kl < 1e-6  # text: 1-D RoPE equals MRoPE with t = h = w
    assert image.mean_kl > 1e-4  # the image prompt: their decoder lacks 3-D positions and DeepStack


def test_doctor_holds_one_decoder_at_a_time(guide_report, guide_export_dir):
    """Our export of pytorch/, their fp32, their int4 (and the recipe variants) each run in their own turn."""
    _, cache, sessions = guide_report
    guide = guide_export_dir.resolve()
    assert {guide / "cpu-fp32/model.onnx.data", guide / "cpu-int4/model.onnx.data"} <= set(sessions.opened)
    assert any(cache.resolve() in f.parents for f in sessions.opened)  # the checkpoint's export ran too
    assert sessions.overlaps == []


def test_doctor_ends_with_what_to_do(guide_report, guide_export_dir):
    report, _, _ = guide_report
    assert report.advice[0].startswith(f"make a correct export: qwen3vl-lab export --hf_dir {guide_export_dir / 'pytorch'}")
    assert report.recipe_lines  # ranked on our export of pytorch/; a recipe is advised only when it beats the default
    if report.best_recipe:
        assert report.best_recipe in report.advice[1]
    else:
        assert report.advice[1].startswith("no INT4 recipe of the ranking above beats the default recipe")
    text = report.render()
    assert "what to do:" in text and "the reference vs our export of the checkpoint" in text


def test_doctor_cli_on_the_guide_export(guide_export_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, "doctor", "--model_dir", guide_export_dir, "--prompt", "Hi", "--n_steps", 3,
                             "--no_recipes", "--quiet")
    assert code == 0, err
    assert "[FAIL] 3-D position ids" in out and "what to do:" in out



def test_sweep_on_the_guide_export_says_what_to_run_instead(guide_export_dir, capsys):
    """A sweep builds variants from our fp32 export; on the guide's folder it names the two ways that work
    (before: "is not the fp32 export (precision None); pass the export folder with cpu-fp32/" of a folder that has one)."""
    before = sorted(p.relative_to(guide_export_dir) for p in guide_export_dir.rglob("*"))
    code, out, err = run_cli(capsys, "sweep", "--model_dir", guide_export_dir, "--quiet")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "was not exported by qwen3vl-lab" in err and f"doctor --model_dir {guide_export_dir}" in err
    assert sorted(p.relative_to(guide_export_dir) for p in guide_export_dir.rglob("*")) == before

def test_doctor_on_onnxruntime_genais_builder_export(genai_int4_dir, genai_fp32_dir, tiny_dir, tmp_path, monkeypatch):
    """Decoders that embed token ids themselves (no embedding graph): their int4 against their fp32, with the
    checkpoint's export for the image probe and the export comparison."""
    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(tmp_path / "cache"))
    with DecoderSessions() as sessions:
        report = diagnose(genai_int4_dir, "int4", reference=genai_fp32_dir, prompts=["Write a haiku about the sea."],
                          n_steps=4, hf_dir=tiny_dir, recipes=False)
    assert sessions.overlaps == []
    status = report.checklist.status()
    assert status["kv_cache"] == "pass" and status["positions"] == "pass"  # 3-D position_ids, read on all rows
    assert status["deepstack"] == "fail" and status["image_probe"] == "fail"
    assert report.comparison.forced[0].steps.size == 4 and report.weights is not None and report.weights.rows
    text, = report.export_comparison.forced  # their fp32 vs our export of the checkpoint, on text: equal
    assert text.agreement == 1.0 and text.mean_kl < 1e-6


def test_doctor_on_the_onnx_community_split(community_export_dir):
    """onnx/decoder_model_merged_q4.onnx against onnx/decoder_model_merged.onnx; no genai_config.json."""
    with DecoderSessions() as sessions:
        report = diagnose(community_export_dir, "int4", prompts=["Write a haiku about the sea."], n_steps=3)
    onnx_dir = community_export_dir.resolve() / "onnx"
    assert set(sessions.opened) == {onnx_dir / "decoder_model_merged.onnx_data", onnx_dir / "decoder_model_merged_q4.onnx_data"}
    assert sessions.overlaps == []  # both in onnx/, one at a time
    status = report.checklist.status()
    assert status["eos"] == "pass" and "no genai_config.json" in report.checklist.item("eos").evidence
    assert status["deepstack"] == "fail" and status["kv_cache"] == "pass"
    assert report.weights.rows and report.comparison.forced[0].steps.size == 3
    assert report.reference.endswith("onnx") and "decoder_model_merged" not in report.folder


def test_kv_cache_check_catches_a_corrupt_cache(tiny_onnx_fp32_dir, tmp_path):
    assert check_kv_cache(load_model(tiny_onnx_fp32_dir)).status == "pass"
    broken = load_model(swap_layer_caches(tiny_onnx_fp32_dir, tmp_path / "broken"))
    item = check_kv_cache(broken)
    assert item.status == "fail" and "max KL" in item.evidence


def test_inspect_says_what_an_export_holds(guide_export_dir, tiny_onnx_dir, capsys):
    import json

    code, out, err = run_cli(capsys, "inspect", "--model_dir", guide_export_dir, "--text_precision", "int4", "--json")
    assert code == 0, err
    a = json.loads(out.strip().splitlines()[-1])
    assert a["kind"] == "guide" and a["precision"] == "int4" and a["model_type"] == "qwen3"
    assert a["io"]["positions"] == "none" and a["io"]["deepstack"] is None
    assert any(m.startswith("3-D positions") for m in a["missing"]) and any(m.startswith("DeepStack") for m in a["missing"])
    assert a["quantization"] == [f"{len(a['matmuls'])} x int4 block 32 accuracy_level 4 symmetric"]  # lm_head too
    assert a["lm_head"].startswith("MatMulNBits int4") and a["checkpoint"].endswith("pytorch")
    code, out, err = run_cli(capsys, "inspect", "--model_dir", tiny_onnx_dir, "--text_precision", "int4")
    assert code == 0 and "missing: nothing" in out and "positions 3d" in out and "fp32" not in out.split("MatMuls:")[1].splitlines()[0]
