"""A downloaded model folder, crafted by an attacker (issue 22, classes 1-3): nothing from it runs, nothing
outside it is read, nothing of the user's is overwritten.

1. Code: a tokenizer folder with an `auto_map` and its own .py, which would write a marker file when imported;
   "y" is fed on standard input (what transformers' "run the custom code? [y/N]" prompt reads). The marker
   never appears; one line, exit 2.
2. Paths: every file name a folder gives (genai_config.json file names, external-data locations, shard
   names in model.safetensors.index.json) is confined to the folder by `paths.inside`. An audit hook records
   every file this process opens: the outside file is never among them.
3. Writes: `doctor --report_dir` and the export's replace step with the user's files in the way: their hashes
   are the same after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.paths import inside

# -- what the process opens ------------------------------------------------------------------------
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only inside `opened()`


@contextmanager
def opened():
    """Every path this process opens inside the block (Python's `open` audit event: builtins.open, io,
    os.open, np.fromfile and np.memmap go through it)."""
    global _OPENED
    _OPENED = seen = []
    try:
        yield seen
    finally:
        _OPENED = None


def touched(seen: list[str], outside: Path) -> list[str]:
    """The opened paths that lead to `outside` (a file, or anything below a folder), symlinks resolved."""
    target = outside.resolve()
    return [p for p in seen if Path(p).resolve() == target or target in Path(p).resolve().parents]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clone(src: Path, dst: Path, copy: tuple[str, ...] = ()) -> Path:
    """Hard links to `src`'s files, real copies of `copy` (relative names of files to edit)."""
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copy2 if p.relative_to(src).as_posix() in copy else os.link)(p, target)
    return dst


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "qwen3vl_lab", *[str(a) for a in argv]]


# -- 1. code from the folder never runs ------------------------------------------------------------
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"


def plant_custom_code(folder: Path, marker: Path) -> None:
    """Make `folder`'s tokenizer one that transformers would load from the folder's own evil_tok.py (and ask
    about it on stdin): an unknown tokenizer_class and an auto_map naming the module."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.unlink()  # a hard link to the shared fixture: replace, never edit
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]})
    path.write_text(json.dumps(config))
    (folder / "evil_tok.py").write_text(PAYLOAD.format(marker=str(marker)))


@pytest.fixture
def evil_export(tiny_onnx_fp32_dir, tmp_path) -> tuple[Path, Path]:
    model = clone(tiny_onnx_fp32_dir, tmp_path / "evil")
    marker = tmp_path / "MARKER"
    plant_custom_code(model / "cpu-fp32", marker)
    return model, marker


@pytest.mark.parametrize("how", ["generate", "interactive", "tokenizer_dir"])
def test_a_folders_own_python_never_runs_even_when_stdin_says_yes(how, evil_export, tiny_onnx_fp32_dir):
    """Real processes with a real "y" on standard input: for `--interactive` it is also the first chat line."""
    model, marker = evil_export
    argv = {"generate": ["--model_dir", model, "--prompt", "Hi", "--max_new_tokens", "2"],
            "interactive": ["--model_dir", model, "--interactive"],
            "tokenizer_dir": ["--model_dir", tiny_onnx_fp32_dir, "--tokenizer_dir", model / "cpu-fp32",
                              "--prompt", "Hi", "--max_new_tokens", "2"]}[how]
    done = subprocess.run(cli("generate", *argv), input="y\ny\nquit\n", capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert_one_line_error(done.returncode, done.stderr, "tokenizer_config.json", "auto_map", "never runs")
    assert "[y/N]" not in done.stdout + done.stderr


def test_without_the_refusal_trust_remote_code_false_still_never_prompts(evil_export, monkeypatch):
    """The second wall: transformers itself, called as we call it, refuses without asking (stdin says "y")."""
    import io

    from qwen3vl_lab import tokenizer

    model, marker = evil_export
    monkeypatch.setattr(tokenizer, "refuse_custom_code", lambda folder: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with pytest.raises(UserError, match="custom code"):
        tokenizer._load_folder.__wrapped__(str(model / "cpu-fp32"))
    assert not marker.exists()


def test_make_guide_export_refuses_a_checkpoint_with_custom_code(tiny_dir, tmp_path, capsys):
    hf = clone(tiny_dir, tmp_path / "hf")
    plant_custom_code(hf, tmp_path / "MARKER")
    code, _, err = run_cli(capsys, "make-guide-export", "--hf_dir", hf, "--output_dir", tmp_path / "out")
    assert_one_line_error(code, err, "auto_map", "never runs")
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "out").exists()
