"""Running exports other tools made: the original guide's (no position_ids, no DeepStack), through our
generate, pipeline and step functions. The reference is transformers on the same checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, grace_hopper, run_cli

from qwen3vl_lab.decoder import MissingPiece
from qwen3vl_lab.generate import generate_tokens, prepare_multimodal_prompt, prepare_prompt
from qwen3vl_lab.model import load_model
from qwen3vl_lab.pipeline import Qwen3VLPipeline
from qwen3vl_lab.sampling import greedy

pytest.importorskip("onnxruntime_genai", reason="the guide's export is built with onnxruntime-genai's builder")
torch = pytest.importorskip("torch")

PROMPT = "Hello, who are you?"
N_NEW = 10


def hf_greedy(hf_model_factory, tiny_dir, ids: np.ndarray, n_new: int) -> list[int]:
    hf = hf_model_factory(tiny_dir)
    hf.model.rope_deltas = None
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                          pad_token_id=151643)
    hf.model.rope_deltas = None
    return out[0, ids.shape[1]:].tolist()


def test_guide_fp32_text_gives_transformers_greedy_tokens(guide_export_dir, tiny_dir, hf_model_factory):
    model = load_model(guide_export_dir, "fp32")
    assert model.kind == "guide" and model.precision == "fp32"
    assert model.teaching_decoder.io.positions == "none" and model.teaching_decoder.io.deepstack is None
    p = prepare_prompt(model, PROMPT)
    ours = list(generate_tokens(model, p, greedy, N_NEW, eos_token_ids=[]))
    assert ours == hf_greedy(hf_model_factory, tiny_dir, p.input_ids, N_NEW)


def test_genai_builder_decoder_that_embeds_token_ids_gives_transformers_greedy_tokens(genai_fp32_dir, tiny_dir,
                                                                                      hf_model_factory):
    """onnxruntime-genai's builder without exclude_embeds: a decoder taking input_ids, no embedding graph."""
    model = load_model(genai_fp32_dir)
    assert model.kind == "genai" and model.embedding is None and model.teaching_decoder.io.token_input == "input_ids"
    p = prepare_prompt(model, PROMPT)
    assert p.inputs_embeds is None  # the decoder embeds the ids itself
    ours = list(generate_tokens(model, p, greedy, N_NEW, eos_token_ids=[]))
    assert ours == hf_greedy(hf_model_factory, tiny_dir, p.input_ids, N_NEW)


def test_genai_builder_int4_generates_from_the_cli(genai_int4_dir, capsys):
    code, out, err = run_cli(capsys, "generate", "--model_dir", genai_int4_dir, "--prompt", PROMPT,
                             "--max_new_tokens", 3, "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 3 and any("embeddings input" in n for n in result["notices"])


def test_guide_int4_runs_and_says_what_it_lacks(guide_export_dir):
    pipe = Qwen3VLPipeline(guide_export_dir, "int4")
    assert pipe.model.precision == "int4"
    assert any("3-D positions" in n and "DeepStack" in n for n in pipe.notices)
    result = pipe.generate_result(PROMPT, max_new_tokens=4, temperature=0)
    assert len(result.token_ids) == 4 and "missing" not in result.to_json()  # text needs nothing it lacks


def test_guide_image_prompt_is_refused_naming_the_missing_piece(guide_export_dir, capsys):
    code, out, err = run_cli(capsys, "generate", "--model_dir", guide_export_dir, "--prompt", "What is it?",
                             "--image", grace_hopper(), "--image_size", 64, "--max_new_tokens", 2)
    errors = [line for line in err.strip().splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "3-D positions" in errors[0] and "DeepStack" in errors[0] and "qwen3vl-lab export --hf_dir" in errors[0]
    model = load_model(guide_export_dir)
    with pytest.raises(MissingPiece, match="cannot read images"):
        prepare_multimodal_prompt(model, "What is it?", images=[grace_hopper()], image_size=64)


def test_guide_image_prompt_with_accept_missing_says_what_it_ran_without(guide_export_dir, capsys, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("QWEN3VL_LAB_CACHE", str(tmp_path / "cache"))  # the reference is built here, not in the export
    before = sorted(p.relative_to(guide_export_dir) for p in guide_export_dir.rglob("*"))
    code, out, err = run_cli(capsys, "generate", "--model_dir", guide_export_dir, "--prompt", "What is it?",
                             "--image", grace_hopper(), "--image_size", 64, "--max_new_tokens", 3,
                             "--temperature", 0, "--accept_missing", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 3 and result["notices"]
    assert any("3-D positions" in m for m in result["missing"]) and any("DeepStack" in m for m in result["missing"])
    assert "ran without 3-D positions" in err and "ran without DeepStack" in err
    assert sorted(p.relative_to(guide_export_dir) for p in guide_export_dir.rglob("*")) == before  # nothing written
    assert any((tmp_path / "cache" / "reference").iterdir())


def test_a_lone_decoder_file_with_a_tokenizer_dir(guide_export_dir, capsys):
    decoder = guide_export_dir / "cpu-fp32" / "model.onnx"
    code, out, err = run_cli(capsys, "generate", "--model_dir", decoder, "--tokenizer_dir", guide_export_dir / "pytorch",
                             "--prompt", PROMPT, "--max_new_tokens", 3, "--temperature", 0, "--json")
    assert code == 0, err
    assert len(json.loads(out.strip().splitlines()[-1])["token_ids"]) == 3


def test_bad_export_folders_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "generate", "--model_dir", tmp_path / "empty", "--prompt", "Hi")
    assert_one_line_error(code, err, "none of the known export layouts")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.onnx", "b.onnx"):
        (two / name).write_bytes(b"")
    code, _, err = run_cli(capsys, "generate", "--model_dir", two, "--prompt", "Hi")
    assert_one_line_error(code, err, "2 candidate decoders")


def test_a_decoder_whose_kv_shapes_disagree_with_its_config(tiny_onnx_fp32_dir, tmp_path, capsys):
    """A config that says other KV heads than the graph: one line naming both numbers."""
    import shutil

    from qwen3vl_lab.layout import OWN_CONFIG

    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_onnx_fp32_dir, folder)
    own = folder / "cpu-fp32" / OWN_CONFIG
    settings = json.loads(own.read_text())
    settings["config"]["text"]["num_key_value_heads"] *= 2
    own.write_text(json.dumps(settings))
    code, _, err = run_cli(capsys, "generate", "--model_dir", folder, "--prompt", "Hi", "--max_new_tokens", 1)
    assert_one_line_error(code, err, "num_key_value_heads = 4", "model.onnx has 2 KV heads")


def test_an_embedding_from_another_model(tiny_onnx_fp32_dir, tmp_path, capsys):
    """The guide layout with an embedding graph of another width: one line naming both widths."""
    import shutil

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path / "other-embedding"
    shutil.copytree(tiny_onnx_fp32_dir, folder)
    table = np.zeros((151936, 8), np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["t", "input_ids"], ["inputs_embeds"])], "e",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["b", "s", 8])],
                              [numpy_helper.from_array(table, "t")])
    path = folder / "cpu-fp32" / "qwen3vl-embedding.onnx"
    for f in folder.joinpath("cpu-fp32").glob("qwen3vl-embedding.onnx*"):
        f.unlink()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    code, _, err = run_cli(capsys, "generate", "--model_dir", folder, "--prompt", "Hi", "--max_new_tokens", 1)
    assert_one_line_error(code, err, "hidden_size = 64", "qwen3vl-embedding.onnx was built with 8")
