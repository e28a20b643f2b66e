"""The foreign-export fixtures (tests/foreign.py) are what they claim to be.

Each fixture's graphs are checked against the published facts about that kind of export (the
guide's decoder has no position_ids and no DeepStack, onnxruntime-genai's builder takes 3-row
position ids, ...), and the fp32 text decoders against transformers' logits on a text prompt (for
text, 1-D RoPE equals MRoPE with t = h = w), so a fixture that built the wrong thing fails here.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from foreign import graph_io, op_types

pytest.importorskip("onnxruntime_genai", reason="the foreign exports are built with onnxruntime-genai's builder")
torch = pytest.importorskip("torch")

PROMPT_IDS = np.array([[151644, 872, 198, 9707, 11, 1879, 525, 498, 30, 151645, 198, 151644, 77091, 198]])  # (1, S)


def names(values) -> list[str]:
    return [v[0] for v in values]


def layer_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n) for kind in ("key", "value")]


def hf_logits(hf_model_factory, tiny_dir, ids: np.ndarray) -> np.ndarray:
    hf = hf_model_factory(tiny_dir)
    hf.model.rope_deltas = None
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids)).logits[0].numpy()  # (S, V)


def run_decoder(path, feeds: dict) -> dict:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def empty_past(n_layers: int, kv: int, hd: int, prefix: str = "past_key_values") -> dict:
    return {name: np.zeros((1, kv, 0, hd), np.float32) for name in layer_names(prefix, n_layers)}


# ---------------------------------------------------------------------------------------------------
# The guide's export
# ---------------------------------------------------------------------------------------------------


def test_guide_layout_files(guide_export_dir):
    fp32, int4 = guide_export_dir / "cpu-fp32", guide_export_dir / "cpu-int4"
    for name in ("qwen3vl-embedding.onnx", "model.onnx", "model.onnx.data", "genai_config.json",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (fp32 / name).is_file(), name
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (int4 / name).is_file(), name
    assert not (int4 / "qwen3vl-embedding.onnx").exists()  # the guide's embedding lives in cpu-fp32 only
    assert (guide_export_dir / "pytorch" / "config.json").is_file()
    assert list((guide_export_dir / "pytorch").glob("*.safetensors"))
    for folder in (fp32, int4):
        assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == "qwen3"


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_guide_decoder_io(guide_export_dir, precision):
    ins, outs = graph_io(guide_export_dir / f"cpu-{precision}" / "model.onnx")
    assert sorted(names(ins)) == sorted(["inputs_embeds", "attention_mask", *layer_names("past_key_values", 4)])
    assert "position_ids" not in names(ins) and "deepstack_embeds" not in names(ins)
    assert names(outs) == ["logits", *[f"present.{i}.key" for i in range(4)], *[f"present.{i}.value" for i in range(4)]]
    ops = op_types(guide_export_dir / f"cpu-{precision}" / "model.onnx")
    assert "GroupQueryAttention" in ops and "MRotaryEmbedding" not in ops  # RoPE inside GQA, from the mask


def test_guide_int4_recipe(guide_export_dir):
    model = onnx.load(str(guide_export_dir / "cpu-int4" / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert any(n.name.startswith("/lm_head/") for n in nbits)  # lm_head quantized too
    assert {(a["bits"], a["block_size"], a["accuracy_level"]) for a in attrs} == {(4, 32, 4)}
    assert all(len(n.input) == 3 for n in nbits)  # symmetric: no zero points
    assert all(n.input[1].endswith("_Q4G32") for n in nbits)  # the RTN quantizer's naming ("default" writes _Q4)
    assert "MatMul" not in {n.op_type for n in model.graph.node}


def test_guide_embedding_graph(guide_export_dir):
    path = guide_export_dir / "cpu-fp32" / "qwen3vl-embedding.onnx"
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    ins, outs = graph_io(path)
    assert ins == [("input_ids", "INT64", ["batch_size", "sequence_length"])]
    assert outs == [("inputs_embeds", "FLOAT", ["batch_size", "sequence_length", 64])]


def test_guide_fp32_text_logits_match_transformers(guide_export_dir, tiny_dir, hf_model_factory):
    """The guide's fp32 embedding + decoder, fed as its own runtime feeds it, give transformers' text logits."""
    folder = guide_export_dir / "cpu-fp32"
    embeds = run_decoder(folder / "qwen3vl-embedding.onnx", {"input_ids": PROMPT_IDS})["inputs_embeds"]
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones_like(PROMPT_IDS), **empty_past(4, 2, 16)}
    logits = run_decoder(folder / "model.onnx", feeds)["logits"][0]
    ref = hf_logits(hf_model_factory, tiny_dir, PROMPT_IDS)
    assert np.abs(logits - ref).max() < 1e-4


def test_guide_tokenizer_is_the_real_one(guide_export_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(guide_export_dir / "cpu-fp32" / "tokenizer.json"))
    assert tok.token_to_id("<|im_end|>") == 151645 and tok.token_to_id("<|image_pad|>") == 151655
    eos = json.loads((guide_export_dir / "cpu-fp32" / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert set(eos) == {151645, 151643}


# ---------------------------------------------------------------------------------------------------
# onnxruntime-genai's builder on the Qwen3-VL checkpoint
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_builder_decoder_io(genai_fp32_dir, genai_int4_dir, precision):
    folder = {"fp32": genai_fp32_dir, "int4": genai_int4_dir}[precision]
    ins, outs = graph_io(folder / "model.onnx")
    assert sorted(names(ins)) == sorted(["input_ids", "attention_mask", "position_ids", *layer_names("past_key_values", 4)])
    assert dict((n, s) for n, _, s in ins)["position_ids"] == [3, "batch_size", "sequence_length"]
    assert sorted(names(outs)) == sorted(["logits", *layer_names("present", 4)])
    ops = op_types(folder / "model.onnx")
    assert "MRotaryEmbedding" in ops and "GroupQueryAttention" in ops
    assert ("GatherBlockQuantized" in ops) == (precision == "int4")  # tied embedding read from the int4 head
    assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == "qwen3_vl_text"
    assert (folder / "tokenizer.json").is_file()


def test_genai_builder_fp32_text_logits_match_transformers(genai_fp32_dir, tiny_dir, hf_model_factory):
    S = PROMPT_IDS.shape[1]
    feeds = {"input_ids": PROMPT_IDS, "attention_mask": np.ones_like(PROMPT_IDS),
             "position_ids": np.broadcast_to(np.arange(S), (3, 1, S)).astype(np.int64), **empty_past(4, 2, 16)}
    logits = run_decoder(genai_fp32_dir / "model.onnx", feeds)["logits"][0]
    assert np.abs(logits - hf_logits(hf_model_factory, tiny_dir, PROMPT_IDS)).max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# Emulated from ours: the community split, renamed outputs, no DeepStack, a broken KV cache
# ---------------------------------------------------------------------------------------------------


def ours_feeds(S: int, embeds: np.ndarray) -> dict:
    return {"inputs_embeds": embeds, "attention_mask": np.ones((1, S), np.int64),
            "position_ids": np.broadcast_to(np.arange(S), (3, 1, S)).astype(np.int64), **empty_past(4, 2, 16)}


def test_community_layout(community_export_dir):
    onnx_dir = community_export_dir / "onnx"
    for stem in ("embed_tokens", "vision_encoder", "decoder_model_merged"):
        for suffix in ("", "_q4"):
            assert (onnx_dir / f"{stem}{suffix}.onnx").is_file() and (onnx_dir / f"{stem}{suffix}.onnx_data").is_file()
    assert not list(onnx_dir.glob("*.data"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (community_export_dir / name).is_file(), name
    for suffix in ("", "_q4"):
        ins, outs = graph_io(onnx_dir / f"decoder_model_merged{suffix}.onnx")
        assert sorted(names(ins)) == sorted(["inputs_embeds", "attention_mask", "position_ids",
                                             *layer_names("past_key_values", 4)])
        assert sorted(names(outs)) == sorted(["logits", *layer_names("present", 4)])
        sess = ort.InferenceSession(str(onnx_dir / f"decoder_model_merged{suffix}.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_overridable_initializers()] == ["num_logits_to_keep"]
        assert names(graph_io(onnx_dir / f"vision_encoder{suffix}.onnx")[1]) == ["image_features"]  # no DeepStack
    assert ("MatMulNBits" in op_types(onnx_dir / "decoder_model_merged_q4.onnx"))


def test_community_fp32_text_logits_match_transformers(community_export_dir, tiny_dir, hf_model_factory):
    onnx_dir = community_export_dir / "onnx"
    embeds = run_decoder(onnx_dir / "embed_tokens.onnx", {"input_ids": PROMPT_IDS})["inputs_embeds"]
    logits = run_decoder(onnx_dir / "decoder_model_merged.onnx", ours_feeds(PROMPT_IDS.shape[1], embeds))["logits"][0]
    assert np.abs(logits - hf_logits(hf_model_factory, tiny_dir, PROMPT_IDS)).max() < 1e-4


def test_no_deepstack_decoder_has_no_input_and_keeps_text_logits(no_deepstack_export_dir, tiny_onnx_fp32_dir):
    folder, ours = no_deepstack_export_dir / "cpu-fp32", tiny_onnx_fp32_dir / "cpu-fp32"
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "deepstack_embeds" not in {i.name for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]}
    assert not [n for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
                if "deepstack_embeds" in n.input]
    embeds = np.random.default_rng(0).standard_normal((1, 6, 64)).astype(np.float32)
    mine = run_decoder(folder / "model.onnx", ours_feeds(6, embeds))["logits"]
    theirs = run_decoder(ours / "model.onnx", ours_feeds(6, embeds))["logits"]  # deepstack not fed: zeros
    assert np.array_equal(mine, theirs)
    assert not (folder / "model-fast.onnx").exists()
    assert "deepstack_embeds" not in json.loads((folder / "qwen3vl_lab.json").read_text())["decoder"]["inputs"]


def test_renamed_outputs(renamed_export_dir, tiny_onnx_fp32_dir):
    folder = renamed_export_dir / "cpu-fp32"
    outs = names(graph_io(folder / "model.onnx")[1])
    assert sorted(outs) == sorted(["logits", *layer_names("present_key_values", 4)])
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["outputs"]
    assert cfg["present_key_names"] == "present_key_values.%d.key"
    embeds = np.random.default_rng(0).standard_normal((1, 6, 64)).astype(np.float32)
    mine = run_decoder(folder / "model.onnx", ours_feeds(6, embeds))
    theirs = run_decoder(tiny_onnx_fp32_dir / "cpu-fp32" / "model.onnx", ours_feeds(6, embeds))
    assert np.array_equal(mine["logits"], theirs["logits"])
    assert np.array_equal(mine["present_key_values.3.value"], theirs["present.3.value"])


def cached_vs_recomputed(folder, embeds: np.ndarray) -> float:
    """max |logits| difference at the last position: prefill S-1 then one decode step with the returned
    cache, versus one prefill of all S positions."""
    S = embeds.shape[1]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    first = dict(zip(out_names, sess.run(None, ours_feeds(S - 1, embeds[:, :-1]))))
    past = {f"past_key_values.{i}.{k}": first[f"present.{i}.{k}"] for i in range(4) for k in ("key", "value")}
    step = {"inputs_embeds": embeds[:, -1:], "attention_mask": np.ones((1, S), np.int64),
            "position_ids": np.full((3, 1, 1), S - 1, np.int64), **past}
    cached = sess.run(["logits"], step)[0][0, -1]
    full = sess.run(["logits"], ours_feeds(S, embeds))[0][0, -1]
    return float(np.abs(cached - full).max())


def test_broken_kv_cache_differs_from_recomputing(broken_kv_export_dir, tiny_onnx_fp32_dir):
    embeds = np.random.default_rng(0).standard_normal((1, 8, 64)).astype(np.float32)
    assert cached_vs_recomputed(tiny_onnx_fp32_dir / "cpu-fp32", embeds) < 1e-4  # ours: the cache is consistent
    assert cached_vs_recomputed(broken_kv_export_dir / "cpu-fp32", embeds) > 1e-2
    prefill = run_decoder(broken_kv_export_dir / "cpu-fp32" / "model.onnx", ours_feeds(8, embeds))["logits"]
    ref = run_decoder(tiny_onnx_fp32_dir / "cpu-fp32" / "model.onnx", ours_feeds(8, embeds))["logits"]
    assert np.array_equal(prefill, ref)  # only what goes through the cache is wrong
