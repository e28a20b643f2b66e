"""The CLI: the main job end to end, and every kind of bad input ends in one line, exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_one_line_error
from helpers import run_cli as run


@pytest.fixture(scope="module")
def onnx_dir(tiny_onnx_fp32_dir):
    return tiny_onnx_fp32_dir  # shared across test files: never modified in place

def gen(onnx_dir, *extra):
    return ("generate", "--model_dir", str(onnx_dir), "--prompt", "Hello", "--max_new_tokens", "4", *extra)


# -- the main job ------------------------------------------------------------------------------
def test_json_output_is_the_last_line_and_greedy_reproduces(onnx_dir, capsys):
    code, out, _ = run(capsys, *gen(onnx_dir, "--temperature", "0", "--json"))
    assert code == 0
    first = json.loads(out.strip().splitlines()[-1])
    assert len(first["token_ids"]) == 4 and isinstance(first["text"], str)
    code, out, _ = run(capsys, *gen(onnx_dir, "--no_sample", "--json"))
    assert json.loads(out.strip().splitlines()[-1])["token_ids"] == first["token_ids"]


def test_seed_makes_sampling_reproducible(onnx_dir, capsys):
    def ids(seed):
        code, out, _ = run(capsys, *gen(onnx_dir, "--seed", str(seed), "--temperature", "1.5", "--top_k", "0",
                                        "--top_p", "1.0", "--max_new_tokens", "8", "--json"))
        assert code == 0
        return json.loads(out.strip().splitlines()[-1])["token_ids"]

    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


def test_raw_skips_the_chat_template(onnx_dir, capsys):
    code, out, _ = run(capsys, *gen(onnx_dir, "--raw", "--temperature", "0", "--json"))
    raw = json.loads(out.strip().splitlines()[-1])
    code, out, _ = run(capsys, *gen(onnx_dir, "--temperature", "0", "--json"))
    chat = json.loads(out.strip().splitlines()[-1])
    assert raw["prompt_tokens"] == 1 and chat["prompt_tokens"] > 5


def test_interactive_keeps_history_and_leaves_on_quit(onnx_dir, capsys, monkeypatch):
    lines = iter(["Hello there", "And again?", "quit"])
    prompts = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return next(lines)

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, _ = run(capsys, "generate", "--model_dir", str(onnx_dir), "--interactive", "--max_new_tokens", "3",
                       "--temperature", "0")
    assert code == 0 and len(prompts) == 3
    assert len(out.strip().splitlines()) == 2  # one answer per turn


def test_interactive_leaves_on_eof_and_ctrl_c_stops_only_the_answer(onnx_dir, capsys, monkeypatch):
    import qwen3vl_lab.pipeline as pipeline

    calls = {"n": 0}
    real_stream = pipeline.Qwen3VLPipeline.stream

    def interrupted_stream(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # Ctrl-C during the first answer
        yield from real_stream(self, *a, **k)

    monkeypatch.setattr(pipeline.Qwen3VLPipeline, "stream", interrupted_stream)
    answers = iter(["first", "second"])

    def fake_input(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, _ = run(capsys, "generate", "--model_dir", str(onnx_dir), "--interactive", "--max_new_tokens", "2")
    assert code == 0 and calls["n"] == 2
    assert "[stopped]" in out.splitlines()[0]


def test_python_m_and_console_script_run_end_to_end(onnx_dir):
    cmd = [sys.executable, "-m", "qwen3vl_lab", *gen(onnx_dir, "--temperature", "0", "--json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["token_ids"]
    exe = shutil.which("qwen3vl-lab")
    if exe:
        done = subprocess.run([exe, "generate", "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "--max_new_tokens" in done.stdout


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (("--temperature", "-1"), "--temperature"),
    (("--top_p", "0"), "--top_p"),
    (("--top_p", "1.5"), "--top_p"),
    (("--top_k", "-3"), "--top_k"),
    (("--max_new_tokens", "0"), "--max_new_tokens"),
    (("--max_new_tokens", "ten"), "--max_new_tokens"),
    (("--no_such_flag",), "--no_such_flag"),
    (("--text_precision", "int3"), "--text_precision"),
])
def test_invalid_values_are_one_line_errors(onnx_dir, capsys, flags, needle):
    code, _, err = run(capsys, *gen(onnx_dir, *flags))
    assert_one_line_error(code, err, needle)


def test_model_dir_problems(onnx_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model_dir", str(tmp_path / "nope"), "--prompt", "x")
    assert_one_line_error(code, err, "does not exist", "export")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "generate", "--model_dir", str(empty), "--prompt", "x")
    assert_one_line_error(code, err, "none of the known export layouts", "cpu-<precision>")
    code, _, err = run(capsys, *gen(onnx_dir, "--text_precision", "int4"))
    assert_one_line_error(code, err, "no int4 decoder", "--precision int4")
    missing = tmp_path / "missing"
    shutil.copytree(onnx_dir, missing)
    (missing / "cpu-fp32" / "model.onnx").unlink()
    code, _, err = run(capsys, *gen(missing))
    assert_one_line_error(code, err, "model.onnx", "export")


def test_corrupt_onnx_file(onnx_dir, tmp_path, capsys):
    bad = tmp_path / "corrupt"
    shutil.copytree(onnx_dir, bad)
    (bad / "cpu-fp32" / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    code, _, err = run(capsys, *gen(bad))
    assert_one_line_error(code, err, "model.onnx", "re-export")


def test_prompt_longer_than_the_context(onnx_dir, tmp_path, capsys):
    small = tmp_path / "small-context"
    shutil.copytree(onnx_dir, small)
    cfg_path = small / "cpu-fp32" / "qwen3vl_lab.json"  # our settings (genai_config.json is onnxruntime-genai's)
    cfg = json.loads(cfg_path.read_text())
    cfg["config"]["text"]["max_position_embeddings"] = 16
    cfg_path.write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", "--model_dir", str(small), "--prompt", "word " * 40)
    assert_one_line_error(code, err, "context", "shorten")


def test_nothing_to_do(onnx_dir, capsys):
    code, _, err = run(capsys, "generate", "--model_dir", str(onnx_dir))
    assert_one_line_error(code, err, "--prompt")


def test_export_refuses_a_folder_that_is_not_qwen3vl(tmp_path, capsys):
    hf = tmp_path / "llama"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", "--hf_dir", str(hf), "--output_dir", str(out))
    assert_one_line_error(code, err, "llama", "Qwen3-VL")
    assert not out.exists()


def test_export_without_weights_or_config(tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", "--hf_dir", str(tmp_path), "--output_dir", str(out))
    assert_one_line_error(code, err, "config.json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_dir / "config.json", no_weights / "config.json")
    code, _, err = run(capsys, "export", "--hf_dir", str(no_weights), "--output_dir", str(out))
    assert_one_line_error(code, err, "safetensors")
    assert not out.exists()


def test_failed_export_writes_nothing_and_keeps_an_old_export(tiny_dir, onnx_dir, tmp_path, capsys):
    """A checkpoint whose weights break halfway: no partial folder, a previous export stays intact."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated file
    fresh = tmp_path / "fresh"
    code, _, err = run(capsys, "export", "--hf_dir", str(broken), "--output_dir", str(fresh), "--quiet")
    assert_one_line_error(code, err, "model.safetensors")
    assert not fresh.exists()
    old = tmp_path / "old"
    shutil.copytree(onnx_dir, old)
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    code, _, err = run(capsys, "export", "--hf_dir", str(broken), "--output_dir", str(old), "--quiet")
    assert code == 2
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before


def test_unknown_precision(tiny_dir, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--hf_dir", str(tiny_dir), "--output_dir", str(tmp_path / "o"),
                       "--precision", "fp8")
    assert_one_line_error(code, err, "fp8")


def test_make_tiny_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "make-tiny", "--output_dir", str(target))
    assert_one_line_error(code, err)
    assert (target / "keep.txt").read_text() == "mine"


def test_cli_generate_matches_step_functions(onnx_dir, capsys):
    """The CLI's greedy tokens are the argmax chain of the step functions (no hidden logic in the CLI)."""
    from qwen3vl_lab.model import load_model
    from qwen3vl_lab.steps import build_positions, decode_step, embed, prefill, tokenize

    code, out, _ = run(capsys, *gen(onnx_dir, "--temperature", "0", "--json"))
    cli_ids = json.loads(out.strip().splitlines()[-1])["token_ids"]
    model = load_model(onnx_dir)
    ids = tokenize(model, "Hello")
    pos = build_positions(ids)
    step = prefill(model, embed(model, ids), pos)
    chain = []
    for _ in range(4):
        chain.append(int(np.argmax(step.logits[0])))
        step = decode_step(model, np.array([[chain[-1]]]), step.cache, pos.rope_deltas)
    assert cli_ids == chain
