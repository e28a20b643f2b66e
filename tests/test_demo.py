"""`qwen3vl-lab demo` and `generate` without --model_dir: the shipped trained shapes model answers right.

The truth comes from the scene's own objects (`shapes.task.heldout_scene` + `question_answer_pairs`),
rebuilt here, never from what the demo printed.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import assert_one_line_error
from helpers import run_cli as run
from PIL import Image

from qwen3vl_lab.shapes import task


@pytest.fixture
def cache(lab_cache, monkeypatch):
    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(lab_cache))
    return lab_cache


def truth(scene: int) -> list[task.QA]:
    _, objects = task.heldout_scene(scene)
    return task.question_answer_pairs(objects)


def test_demo_answers_a_held_out_scene_right(cache, tmp_path, capsys):
    picture = tmp_path / "demo.png"
    code, out, err = run(capsys, "demo", "--json", "--picture", picture, "--quiet")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    expected = truth(0)  # scene 0: one object, four questions
    assert [a["question"] for a in result["answers"]] == [qa.question for qa in expected]
    assert [a["truth"] for a in result["answers"]] == [qa.answer for qa in expected]
    assert [a["answer"] for a in result["answers"]] == [qa.answer for qa in expected]  # the model is right here
    assert result["right"] == result["total"] == 4

    steps = result["steps"]
    colour = expected[1]
    assert steps["question"] == colour.question and colour.kind == "colour"
    calls = steps["calls"]
    assert calls[0]["kind"] == "prefill" and calls[0]["cache_length"] == len(steps["prompt_tokens"])
    for before, after in zip(calls, calls[1:]):  # one position and one cache slot per decode call
        assert after["cache_length"] == before["cache_length"] + 1
        assert after["cache_bytes"] > before["cache_bytes"]
        assert after["position"] == [before["position"][0] + 1] * 3  # text after the image: t = h = w
        assert after["fed"] == repr(before["chose"])
    assert "".join(c["chose"] for c in calls[:-1]) == colour.answer and calls[-1]["chose"] == "<|im_end|>"
    assert len(steps["image_positions"][0]) == task.N_CELLS  # one image token per cell
    for path in (picture, tmp_path / "demo-scene.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scene, _ = task.heldout_scene(0)
    assert Image.open(tmp_path / "demo-scene.png").tobytes() == scene.tobytes()


def test_demo_text_marks_each_answer_against_the_truth(cache, tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--scene", "1", "--picture", tmp_path / "d.png", "--quiet")
    assert code == 0
    columns = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.startswith("  Wh")]
    rows = {c[0]: c[1:] for c in columns}  # question -> [model says, truth, right]
    expected = truth(1)  # two objects, seven questions
    assert set(rows) == {qa.question for qa in expected}
    right = 0
    for qa in expected:
        said, shown, verdict = rows[qa.question]
        assert shown == qa.answer
        assert verdict == ("yes" if said == qa.answer else "NO"), rows[qa.question]
        right += verdict == "yes"
    assert f"{right}/{len(expected)} exact matches" in out
    assert "where to go next" in out and "qwen3vl-lab generate --image" in out


def test_generate_without_model_dir_uses_the_shapes_model(cache, tmp_path, capsys):
    scene, objects = task.heldout_scene(2)
    scene.save(tmp_path / "scene.png")
    qa = task.question_answer_pairs(objects, kinds=["shape"])[0]
    code, out, err = run(capsys, "generate", "--image", tmp_path / "scene.png", "--prompt", qa.question,
                         "--no_sample", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["text"] == qa.answer
    notes = [line for line in err.splitlines() if "no --model_dir" in line]
    assert len(notes) == 1 and notes[0].startswith("qwen3vl-lab: note: ")
    assert any("no --model_dir" in n for n in result["notices"])


@pytest.mark.parametrize("argv, needle", [
    (["--picture", "demo.txt"], ".png"),
    (["--picture", "no/such/folder/demo.png"], "folder"),
    (["--picture", "."], "folder"),
    (["--scene", "-1"], "--scene"),
])
def test_demo_bad_input_is_one_line(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(tmp_path / "cache"))
    code, _, err = run(capsys, "demo", *argv)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # refused before any work


def test_generate_default_model_is_fp32_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(tmp_path / "cache"))
    code, _, err = run(capsys, "generate", "--prompt", "Hi", "--text_precision", "int4")
    assert_one_line_error(code, err, "--model_dir")
