"""find_layout / read_genai_config on every kind of export people arrive with, and on bad paths.

The expected numbers come from the tiny checkpoint's config.json (4 layers, 2 kv heads, head_dim 16,
hidden 64, vocab 151936, context 32768) and the expected files from each export's published layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from qwen3vl_lab.errors import UserError
from qwen3vl_lab.layouts import find_layout, read_genai_config

TINY = dict(num_layers=4, num_attention_heads=4, kv_heads=2, head_size=16, hidden_size=64, vocab_size=151936,
            context_length=32768)


def assert_numbers(info, **expected):
    for key, value in {**TINY, **expected}.items():
        assert getattr(info, key) == value, key


def write_graph(path: Path, inputs=("inputs_embeds",), outputs=("logits",)) -> Path:
    """A minimal valid ONNX graph (Identity chains) with the given I/O names."""
    nodes = [helper.make_node("Identity", [inputs[0]], [o]) for o in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, [1]) for i in inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1]) for o in outputs])
    onnx.save(helper.make_model(graph), str(path))
    return path


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------
# Our own export
# ---------------------------------------------------------------------------------------------------


def test_ours_root(tiny_onnx_dir):
    layout = find_layout(tiny_onnx_dir, "int4")
    folder = tiny_onnx_dir / "cpu-int4"
    assert layout.kind == "qwen3vl-lab" and layout.precision == "int4" and layout.folder == folder
    assert layout.decoder == folder / "model.onnx"
    assert layout.embedding == folder / "qwen3vl-embedding.onnx"
    assert layout.vision == folder / "qwen3vl-vision.onnx"
    assert layout.genai_config == folder / "genai_config.json"
    assert layout.precisions == ("fp32", "int4")
    assert layout.hf_dir is None  # our pytorch/ holds config and tokenizer files, no weights
    assert layout.tokenizer_dir == folder and layout.notices == ()  # tokenizer.json where onnxruntime-genai reads it


def test_ours_default_precision_and_precision_folder(tiny_onnx_dir):
    assert find_layout(tiny_onnx_dir).precision == "fp32"
    layout = find_layout(tiny_onnx_dir / "cpu-int4", "fp32")  # a precision folder is used as it is
    assert (layout.precision, layout.root, layout.precisions) == ("int4", tiny_onnx_dir, ("fp32", "int4"))


def test_ours_genai_config_numbers(tiny_onnx_fp32_dir):
    info = read_genai_config(tiny_onnx_fp32_dir / "cpu-fp32")
    assert_numbers(info)
    assert info.type == "qwen3_vl" and set(info.eos_token_ids) == {151645, 151643}
    assert info.embedding_file == "qwen3vl-embedding-genai.onnx" and info.decoder_file == "model.onnx"  # genai's view


# ---------------------------------------------------------------------------------------------------
# The guide's export
# ---------------------------------------------------------------------------------------------------


def test_guide_root(guide_export_dir):
    layout = find_layout(guide_export_dir)
    fp32 = guide_export_dir / "cpu-fp32"
    assert layout.kind == "guide" and layout.precision == "fp32" and layout.precisions == ("fp32", "int4")
    assert layout.decoder == fp32 / "model.onnx" and layout.embedding == fp32 / "qwen3vl-embedding.onnx"
    assert layout.vision is None and layout.genai_config == fp32 / "genai_config.json"
    assert layout.tokenizer_dir == fp32
    assert layout.hf_dir == guide_export_dir / "pytorch"


def test_guide_int4_takes_the_fp32_embedding(guide_export_dir):
    for path in (guide_export_dir, guide_export_dir / "cpu-int4"):
        layout = find_layout(path, "int4")
        assert layout.kind == "guide" and layout.precision == "int4"
        assert layout.decoder == guide_export_dir / "cpu-int4" / "model.onnx"
        assert layout.embedding == guide_export_dir / "cpu-fp32" / "qwen3vl-embedding.onnx"
        assert layout.tokenizer_dir == guide_export_dir / "cpu-int4"


def test_guide_genai_config_numbers(guide_export_dir):
    info = read_genai_config(guide_export_dir / "cpu-int4" / "genai_config.json")
    assert_numbers(info)
    assert info.type == "qwen3" and info.is_qwen3 and set(info.eos_token_ids) == {151645, 151643}
    assert "position_ids" not in info.decoder_inputs
    assert info.decoder_outputs["present_key_names"] == "present.%d.key"
    assert info.embedding_file is None and info.vision_file is None


def test_guide_without_tokenizer_falls_back_to_pytorch(guide_export_dir, tmp_path):
    shutil.copytree(guide_export_dir, tmp_path / "guide")
    for f in (tmp_path / "guide").glob("cpu-*/tokenizer.json"):
        f.unlink()
    assert find_layout(tmp_path / "guide").tokenizer_dir == tmp_path / "guide" / "pytorch"
    shutil.rmtree(tmp_path / "guide" / "pytorch")
    layout = find_layout(tmp_path / "guide")
    assert layout.tokenizer_dir is None and layout.hf_dir is None
    assert any("package's copy" in n for n in layout.notices)


# ---------------------------------------------------------------------------------------------------
# onnxruntime-genai's builder, the onnx-community split, our variants
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_builder_folder(genai_fp32_dir, genai_int4_dir, precision):
    folder = {"fp32": genai_fp32_dir, "int4": genai_int4_dir}[precision]
    layout = find_layout(folder)
    assert layout.kind == "genai" and layout.precision == precision and layout.precisions == (precision,)
    assert layout.decoder == folder / "model.onnx" and layout.embedding is None and layout.vision is None
    assert layout.genai_config == folder / "genai_config.json" and layout.tokenizer_dir == folder
    assert layout.hf_dir is None and layout.root == folder and layout.notices == ()
    info = read_genai_config(folder)
    assert_numbers(info)
    assert info.type == "qwen3_vl_text" and info.decoder_inputs["position_ids"] == "position_ids"
    assert "input_ids" in info.decoder_inputs


def test_genai_config_naming_a_missing_embedding_is_said(genai_fp32_dir, tmp_path):
    folder = tmp_path / "g"
    shutil.copytree(genai_fp32_dir, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["embedding"] = {"filename": "embedding.onnx"}
    (folder / "genai_config.json").write_text(json.dumps(config))
    layout = find_layout(folder)
    assert layout.embedding is None and any("embedding.onnx" in n and "missing" in n for n in layout.notices)


@pytest.mark.parametrize("given", ["root", "onnx"])
def test_community_split(community_export_dir, given):
    onnx_dir = community_export_dir / "onnx"
    path = community_export_dir if given == "root" else onnx_dir
    fp32 = find_layout(path)
    assert fp32.kind == "onnx-community" and fp32.precision == "fp32" and fp32.precisions == ("fp32", "int4")
    assert fp32.decoder == onnx_dir / "decoder_model_merged.onnx"
    assert fp32.embedding == onnx_dir / "embed_tokens.onnx" and fp32.vision == onnx_dir / "vision_encoder.onnx"
    assert fp32.genai_config is None and fp32.tokenizer_dir == community_export_dir and fp32.root == community_export_dir
    q4 = find_layout(path, "int4")
    assert q4.decoder == onnx_dir / "decoder_model_merged_q4.onnx" and q4.embedding == onnx_dir / "embed_tokens_q4.onnx"
    assert q4.notices == ()


def test_community_missing_suffix_variant_falls_back_to_fp32_and_says_so(community_export_dir, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(community_export_dir, root)
    (root / "onnx" / "embed_tokens_q4.onnx").unlink()
    layout = find_layout(root, "int4")
    assert layout.embedding == root / "onnx" / "embed_tokens.onnx"
    assert any("embed_tokens_q4.onnx is missing" in n for n in layout.notices)
    with pytest.raises(UserError) as e:
        find_layout(root, "fp16")
    assert "no fp16 decoder" in one_line(e) and "int4 (_q4)" in str(e.value)


@pytest.mark.parametrize("fixture", ["renamed_export_dir", "no_deepstack_export_dir", "broken_kv_export_dir"])
def test_variants_of_ours_are_ours(request, fixture):
    root = request.getfixturevalue(fixture)
    layout = find_layout(root)
    assert layout.kind == "qwen3vl-lab" and layout.decoder == root / "cpu-fp32" / "model.onnx"
    assert layout.precisions == ("fp32",) and layout.embedding == root / "cpu-fp32" / "qwen3vl-embedding.onnx"


# ---------------------------------------------------------------------------------------------------
# A lone decoder file, a folder of graphs
# ---------------------------------------------------------------------------------------------------


def test_single_decoder_file(guide_export_dir, tmp_path):
    decoder = guide_export_dir / "cpu-fp32" / "model.onnx"
    layout = find_layout(decoder, tokenizer_dir=guide_export_dir / "pytorch")
    assert layout.kind == "single-decoder" and layout.decoder == decoder and layout.genai_config is None
    assert layout.tokenizer_dir == guide_export_dir / "pytorch" and layout.precision == "fp32"
    int4 = find_layout(guide_export_dir / "cpu-int4" / "model.onnx")
    assert int4.precision == "int4" and int4.tokenizer_dir == guide_export_dir / "cpu-int4"  # tokenizer.json beside it


def test_folder_with_one_decoder_graph(tmp_path):
    write_graph(tmp_path / "decoder.onnx")
    write_graph(tmp_path / "embed_tokens.onnx", ("input_ids",), ("inputs_embeds",))
    layout = find_layout(tmp_path)
    assert layout.kind == "single-decoder" and layout.decoder == tmp_path / "decoder.onnx"
    assert layout.embedding == tmp_path / "embed_tokens.onnx"
    assert layout.tokenizer_dir is None and layout.notices  # said, not hidden


# ---------------------------------------------------------------------------------------------------
# read_genai_config on a hand-written foreign file
# ---------------------------------------------------------------------------------------------------


def test_read_genai_config_tolerates_missing_keys(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps(
        {"model": {"type": "qwen3_vl_text", "eos_token_id": 151645, "decoder": {"num_hidden_layers": 2}},
         "search": {"max_length": 64}, "something_else": 1}))
    info = read_genai_config(tmp_path)
    assert info.type == "qwen3_vl_text" and info.num_layers == 2 and info.eos_token_ids == (151645,)
    assert info.kv_heads is None and info.vocab_size is None and info.decoder_file is None


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming what was found and what is expected
# ---------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(UserError) as e:
        find_layout(tmp_path / "nope")
    assert "does not exist" in one_line(e)


def test_file_where_a_folder_is_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError) as e:
        find_layout(tmp_path / "notes.txt")
    assert "is a file" in one_line(e)
    with pytest.raises(UserError) as e:
        find_layout(tmp_path, tokenizer_dir=tmp_path / "notes.txt")
    assert "--tokenizer_dir" in one_line(e) and "is a file" in str(e.value)


def test_no_known_layout(tmp_path):
    (tmp_path / "README.md").write_text("weights elsewhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError) as e:
        find_layout(tmp_path)
    msg = one_line(e)
    assert "none of the known export layouts" in msg and "README.md" in msg and "genai_config.json" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        find_layout(tmp_path / "empty")
    assert "it is empty" in one_line(e)


def test_two_candidate_decoders(tmp_path):
    write_graph(tmp_path / "model.onnx")
    write_graph(tmp_path / "decoder_model_merged.onnx")
    with pytest.raises(UserError) as e:
        find_layout(tmp_path)
    msg = one_line(e)
    assert "2 candidate decoders" in msg and "model.onnx" in msg and "decoder_model_merged.onnx" in msg


def test_two_community_decoder_kinds(tmp_path):
    (tmp_path / "onnx").mkdir()
    write_graph(tmp_path / "onnx" / "model.onnx")
    write_graph(tmp_path / "onnx" / "decoder_model_merged_q4.onnx")
    with pytest.raises(UserError) as e:
        find_layout(tmp_path)
    assert "two candidate decoders" in one_line(e)


def test_precision_not_in_export(guide_export_dir, tmp_path):
    shutil.copytree(guide_export_dir / "cpu-fp32", tmp_path / "cpu-fp32")
    with pytest.raises(UserError) as e:
        find_layout(tmp_path, "int4")
    msg = one_line(e)
    assert "no int4 decoder" in msg and "found fp32" in msg


def test_genai_config_naming_a_missing_decoder(guide_export_dir, tmp_path):
    (tmp_path / "genai_config.json").write_bytes((guide_export_dir / "cpu-fp32" / "genai_config.json").read_bytes())
    with pytest.raises(UserError) as e:
        find_layout(tmp_path)
    assert "names the decoder model.onnx, which is missing" in one_line(e)


@pytest.mark.parametrize("text,needle", [("{not json", "not valid JSON"), ("[1, 2]", "not an object"),
                                         ('{"search": {}}', 'no "model" section')])
def test_bad_genai_config(tmp_path, text, needle):
    (tmp_path / "genai_config.json").write_text(text)
    with pytest.raises(UserError) as e:
        find_layout(tmp_path)
    assert needle in one_line(e)
