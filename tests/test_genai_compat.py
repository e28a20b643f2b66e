"""Our export runs in onnxruntime-genai 0.18 unchanged: `og.Model(OUT/cpu-<p>)` loads it and its greedy
text tokens are ours (fp32: also transformers'), fp32 and INT4.

What that needed, each checked here: genai_config.json holds only onnxruntime-genai's schema (our
settings moved to qwen3vl_lab.json, still read from the old embedded section), tokenizer.json sits in
the precision folder, the decoder's deepstack_embeds is optional (zeros when not fed), and the
embedding model onnxruntime-genai runs takes the image_features input it feeds.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from safetensors import safe_open

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install -e .[dev])")

from qwen3vl_lab.generate import generate_tokens, prepare_ids  # noqa: E402
from qwen3vl_lab.layout import GENAI_CONFIG, GENAI_EMBEDDING_FILE, OWN_CONFIG  # noqa: E402
from qwen3vl_lab.model import load_model  # noqa: E402
from qwen3vl_lab.pipeline import greedy  # noqa: E402
from qwen3vl_lab.tokenizer import format_chat  # noqa: E402

N_NEW = 10
IMAGE_TOKEN_ID = 151655


def genai_greedy(folder, ids: list[int], n_new: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n_new, min_length=len(ids) + n_new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(ids):]]


def our_greedy(model, ids: list[int], n_new: int) -> list[int]:
    prompt = prepare_ids(model, np.array([ids], np.int64))
    return list(generate_tokens(model, prompt, greedy, n_new, eos_token_ids=()))


@pytest.fixture(scope="module")
def chat_ids(tiny_onnx_dir) -> list[int]:
    model = load_model(tiny_onnx_dir, "fp32")
    return [int(i) for i in model.tokenizer.encode(format_chat(model.tokenizer, "Hello, who are you?"))]


def embedding_table(tiny_dir) -> np.ndarray:
    with safe_open(str(tiny_dir / "model.safetensors"), "np") as f:
        return f.get_tensor("model.language_model.embed_tokens.weight")  # (V, H)


# ---------------------------------------------------------------------------------------------------
# og.Model loads the folder as written, and generates our tokens
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_loads_our_folder_unchanged(tiny_onnx_dir, precision):
    folder = tiny_onnx_dir / f"cpu-{precision}"
    before = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    model = og.Model(str(folder))
    assert model.type == "qwen3_vl"
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == before  # nothing written into the folder


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_greedy_tokens_are_ours(tiny_onnx_dir, chat_ids, precision):
    ours = our_greedy(load_model(tiny_onnx_dir, precision), chat_ids, N_NEW)
    theirs = genai_greedy(tiny_onnx_dir / f"cpu-{precision}", chat_ids, N_NEW)
    assert theirs == ours


def test_genai_fp32_greedy_tokens_are_transformers(tiny_onnx_dir, tiny_dir, chat_ids, hf_model_factory):
    torch = pytest.importorskip("torch")
    hf = hf_model_factory(tiny_dir)
    hf.model.rope_deltas = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([chat_ids]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=151643)
    assert genai_greedy(tiny_onnx_dir / "cpu-fp32", chat_ids, N_NEW) == out[0, len(chat_ids):].tolist()


def test_genai_tokenizer_in_the_precision_folder_encodes_like_ours(tiny_onnx_dir):
    model = load_model(tiny_onnx_dir, "fp32")
    tok = og.Tokenizer(og.Model(str(tiny_onnx_dir / "cpu-fp32")))
    for text in ["Hello, who are you?", "你好，世界！🌍 naïve café", "<|im_start|>user\n<|image_pad|><|im_end|>"]:
        assert [int(i) for i in tok.encode(text)] == [int(i) for i in model.tokenizer.encode(text)], text


def test_genai_image_prompt_stops_at_the_missing_processor_config(tiny_onnx_dir):
    """Measured: onnxruntime-genai cannot run our vision graph (it feeds pixel_values only, never DeepStack);
    we ship no processor config, so an image prompt stops before any image is processed."""
    model = og.Model(str(tiny_onnx_dir / "cpu-fp32"))
    with pytest.raises(RuntimeError, match="processor_config.json"):
        model.create_multimodal_processor()


# ---------------------------------------------------------------------------------------------------
# What genai needed, one by one
# ---------------------------------------------------------------------------------------------------


def test_genai_config_holds_only_genai_keys(tiny_onnx_dir):
    folder = tiny_onnx_dir / "cpu-fp32"
    genai = json.loads((folder / GENAI_CONFIG).read_text())
    assert set(genai) == {"model", "search"}
    assert "deepstack_embeds" not in genai["model"]["decoder"]["inputs"]
    assert genai["model"]["embedding"]["filename"] == GENAI_EMBEDDING_FILE
    own = json.loads((folder / OWN_CONFIG).read_text())
    assert own["precision"] == "fp32" and own["decoder"]["inputs"]["deepstack_embeds"] == "deepstack_embeds"
    assert own["vision"]["outputs"]["deepstack_features"] == "deepstack_features"
    assert json.loads((tiny_onnx_dir / "cpu-int4" / OWN_CONFIG).read_text())["precision"] == "int4"


def test_older_export_with_the_embedded_section_still_loads(tiny_onnx_fp32_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_onnx_fp32_dir, old)
    folder = old / "cpu-fp32"
    genai = json.loads((folder / GENAI_CONFIG).read_text())
    genai["qwen3vl_lab"] = json.loads((folder / OWN_CONFIG).read_text())
    (folder / GENAI_CONFIG).write_text(json.dumps(genai))
    (folder / OWN_CONFIG).unlink()
    old_model, new_model = load_model(old), load_model(tiny_onnx_fp32_dir)
    assert old_model.config == new_model.config and old_model.precision == "fp32"


def test_deepstack_input_is_optional_and_still_works(tiny_onnx_fp32_dir):
    """Not fed, the decoder computes what zeros give (a text prompt); fed, DeepStack still changes the logits."""
    model = load_model(tiny_onnx_fp32_dir)
    sess = ort.InferenceSession(str(model.folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "deepstack_embeds" not in {i.name for i in sess.get_inputs()}
    assert "deepstack_embeds" in {i.name for i in sess.get_overridable_initializers()}
    t = model.config.text
    B, S, D = 1, 5, model.config.num_deepstack
    rng = np.random.default_rng(0)
    feeds = {"inputs_embeds": rng.standard_normal((B, S, t.hidden_size)).astype(np.float32),
             "attention_mask": np.ones((B, S), np.int64),
             "position_ids": np.broadcast_to(np.arange(S), (3, B, S)).astype(np.int64),
             **{f"past_key_values.{i}.{k}": np.zeros((B, t.num_key_value_heads, 0, t.head_dim), np.float32)
                for i in range(t.num_hidden_layers) for k in ("key", "value")}}
    absent = sess.run(["logits"], feeds)[0]
    zeros = sess.run(["logits"], {**feeds, "deepstack_embeds": np.zeros((D, B, S, t.hidden_size), np.float32)})[0]
    fed = sess.run(["logits"], {**feeds, "deepstack_embeds": rng.standard_normal((D, B, S, t.hidden_size)).astype(np.float32)})[0]
    assert np.array_equal(absent, zeros)
    assert np.abs(fed - zeros).max() > 1e-2


def test_genai_embedding_puts_image_features_into_image_token_rows(tiny_onnx_fp32_dir, tiny_dir):
    table = embedding_table(tiny_dir)  # (V, H), from the checkpoint
    folder = tiny_onnx_fp32_dir / "cpu-fp32"
    sess = ort.InferenceSession(str(folder / GENAI_EMBEDDING_FILE), providers=["CPUExecutionProvider"])
    ids = np.array([[9707, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 11, IMAGE_TOKEN_ID], [1, 2, 3, 4, 5]], np.int64)  # (B, S)
    feats = np.random.default_rng(1).standard_normal((3, table.shape[1])).astype(np.float32)  # (N, H)
    out = sess.run(["inputs_embeds"], {"input_ids": ids, "image_features": feats})[0]
    expected = table[ids]
    expected[0, [1, 2, 4]] = feats  # the k-th image token (row-major) gets feature k
    assert np.array_equal(out, expected)
    text = sess.run(["inputs_embeds"], {"input_ids": ids[1:], "image_features": np.zeros((0, table.shape[1]), np.float32)})[0]
    assert np.array_equal(text, table[ids[1:]])
    assert (folder / GENAI_EMBEDDING_FILE).stat().st_size < 64_000  # the table stays in qwen3vl-embedding.onnx.data
