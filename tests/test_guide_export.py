"""qwen3vl_lab/export/guide.py: the guide's export builder refuses what it must, and its text checkpoint is exact.

What the built folder holds (layout, decoder I/O, INT4 recipe, logits against transformers) is checked in
tests/test_foreign_exports.py on the session fixture `guide_export_dir`, which this builder makes.
"""

from __future__ import annotations

import sys

import pytest

from qwen3vl_lab.apps.cli import main
from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.guide import genai_build, make_guide_export, qwen3_text_checkpoint


def test_refuses_a_folder_that_is_not_empty(tiny_dir, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_guide_export(tiny_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]  # no temp folder left behind


def test_refuses_a_folder_that_is_not_a_qwen3vl_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        make_guide_export(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refusal_is_one_line_exit_2(tiny_dir, tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"x")
    assert main(["make-guide-export", "--hf_dir", str(tiny_dir), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qwen3vl-lab: error:") and "not empty" in err and "\n" not in err
    assert (out / "model.onnx").read_bytes() == b"x"


def test_missing_onnxruntime_genai_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import of it raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime_genai.models", None)
    with pytest.raises(UserError, match=r"pip install 'qwen3vl-lab\[genai\]'") as e:
        genai_build(tmp_path / "ckpt", tmp_path / "out", "fp32")
    assert "\n" not in str(e.value)


def test_text_checkpoint_keeps_bf16_weights_bit_for_bit(tmp_path):
    """The trained shapes model is stored bf16: its Qwen3 text checkpoint holds the same bits (read by torch)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from qwen3vl_lab.export.tiny import make_tiny

    hf = make_tiny(tmp_path / "hf", preset="shapes", trained=True)
    text = qwen3_text_checkpoint(hf, tmp_path / "text")
    src = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    out = {k: v for f in sorted(text.glob("*.safetensors")) for k, v in load_file(f).items()}
    expected = {("model." + k[len("model.language_model."):]): v for k, v in src.items()
                if k.startswith("model.language_model.")}
    assert sorted(out) == sorted(expected) and "lm_head.weight" not in out  # tied: no separate head
    for name, value in expected.items():
        assert value.dtype == torch.bfloat16 and out[name].dtype == torch.bfloat16, name
        assert torch.equal(out[name], value), name


@pytest.mark.slow  # the child imports torch and transformers (~10 s)
def test_builder_failure_in_a_child_process_is_one_line(tmp_path):
    """Large checkpoints are built in a child process: its failure is a one-line error, and no cache is left."""
    pytest.importorskip("onnxruntime_genai")
    (tmp_path / "ckpt").mkdir()  # no config.json: the builder fails
    with pytest.raises(UserError, match=r"builder failed on .*exit code") as e:
        genai_build(tmp_path / "ckpt", tmp_path / "out", "fp32", separate_process=True)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
