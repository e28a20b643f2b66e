"""qwen3vl_lab.export.tiny.make_tiny: random Qwen3-VL checkpoints that transformers loads as its own."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from qwen3vl_lab.config import load_hf_config, parse_hf_config
from qwen3vl_lab.errors import UserError
from qwen3vl_lab.export.checkpoint import INDEX_NAME, SAFETENSORS_NAME, Checkpoint
from qwen3vl_lab.export.files import STAMP
from qwen3vl_lab.export.tiny import (
    PREPROCESSOR_CONFIG,
    TOKENIZER_FILES,
    expected_parameter_shapes,
    hf_config_dict,
    make_tiny,
)

EMBED = "model.language_model.embed_tokens.weight"


def _folder_mb(path) -> float:
    return sum(p.stat().st_size for p in path.iterdir()) / 1e6


def _load_hf(path, **kw):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    model, info = Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True, **kw
    )
    return model.eval(), info


def _assert_loads_exactly(path):
    """transformers loads every tensor, with no missing/unexpected keys, equal to Checkpoint.get."""
    model, info = _load_hf(path)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    ckpt = Checkpoint.open(path)
    state = model.state_dict()
    tied = model.config.tie_word_embeddings
    assert set(ckpt.names()) == set(state) - ({"lm_head.weight"} if tied else set())
    for name, tensor in state.items():
        source = EMBED if (name == "lm_head.weight" and tied) else name
        np.testing.assert_array_equal(tensor.numpy(), ckpt.get(source), err_msg=name)
    return model, ckpt


def _greedy(model, path, n: int = 20) -> list[int]:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Tell me a story about a cat."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, enc["input_ids"].shape[1]:].tolist()


# ------------------------------------------------------------------------------------------
# the session fixtures (tiny, tiny-deep): layout, loading, generation
# ------------------------------------------------------------------------------------------

def test_tiny_folder_layout_and_size(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    expected = {"config.json", "generation_config.json", SAFETENSORS_NAME, "preprocessor_config.json",
                "video_preprocessor_config.json", *TOKENIZER_FILES, STAMP}
    assert names == expected
    assert _folder_mb(tiny_dir) < 60
    assert not list(tiny_dir.parent.glob(".*")), "temporary folder left behind"
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == gen["bos_token_id"] == 151643
    assert (gen["do_sample"], gen["temperature"], gen["top_k"], gen["top_p"]) == (True, 0.7, 20, 0.8)
    assert json.loads((tiny_dir / "preprocessor_config.json").read_text()) == PREPROCESSOR_CONFIG


def test_tiny_config_matches_facts(tiny_dir):
    cfg = load_hf_config(tiny_dir)
    t, v = cfg.text, cfg.vision
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (151936, 64, 128, 4)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (4, 2, 16)
    assert t.mrope_section == (4, 2, 2) and t.rope_theta == 5e6
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (3, 32, 64, 2, 64)
    assert v.deepstack_visual_indexes == (0, 1, 2) and v.num_position_embeddings == 2304 and v.patch_size == 16
    assert cfg.tie_word_embeddings and cfg.eos_token_ids[:2] == (151645, 151643)
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert raw["text_config"]["rope_parameters"]["mrope_interleaved"] is True
    assert raw["vision_config"]["model_type"] == "qwen3_vl_vision" and raw["dtype"] == "float32"


def test_tiny_weights_are_what_transformers_loads(tiny_dir):
    model, ckpt = _assert_loads_exactly(tiny_dir)
    assert len(ckpt) == 109 and "lm_head.weight" not in ckpt
    assert sum(p.numel() for p in model.parameters()) == 10_120_512  #
    # biases and norms are perturbed, so a port that drops a bias or uses 1 + weight is caught
    for name in ("model.visual.blocks.0.attn.qkv.bias", "model.visual.merger.linear_fc2.bias"):
        assert np.abs(ckpt.get(name)).mean() > 0.01
    for name in ("model.language_model.norm.weight", "model.language_model.layers.0.self_attn.k_norm.weight",
                 "model.visual.deepstack_merger_list.2.norm.weight"):
        w = ckpt.get(name)
        assert abs(w.mean() - 1) < 0.1 and w.std() > 0.03


def test_tiny_greedy_generation_is_not_degenerate(tiny_dir, hf_model_factory):
    tokens = _greedy(hf_model_factory(tiny_dir), tiny_dir)
    assert len(tokens) == 20 and len(set(tokens)) > 3, tokens


def test_tiny_deep_loads_and_generates(tiny_deep_dir, hf_model_factory):
    model, ckpt = _assert_loads_exactly(tiny_deep_dir)
    cfg = load_hf_config(tiny_deep_dir)
    assert cfg.text.q_size == 256 != cfg.text.hidden_size and cfg.vision.deepstack_visual_indexes == (1, 3)
    assert ckpt.shape("model.language_model.layers.2.self_attn.q_proj.weight") == (256, 64)
    tokens = _greedy(hf_model_factory(tiny_deep_dir), tiny_deep_dir)
    assert len(set(tokens)) > 3, tokens


def test_config_json_is_what_transformers_writes(tiny_dir):
    from transformers import AutoConfig, AutoImageProcessor

    text = (tiny_dir / "config.json").read_text()
    assert AutoConfig.from_pretrained(tiny_dir).to_json_string() == text
    proc = AutoImageProcessor.from_pretrained(tiny_dir)
    assert (proc.patch_size, proc.merge_size, proc.temporal_patch_size) == (16, 2, 2)
    assert list(proc.image_mean) == [0.5] * 3 and proc.size.shortest_edge == 65536


def test_importing_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, qwen3vl_lab.export.checkpoint, qwen3vl_lab.export.tiny; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_tokenizer_loads_offline(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|image_pad|>"]) == [151644, 151645, 151655]
    assert tok("<|im_start|>user\n")["input_ids"] == [151644, 872, 198]


# ------------------------------------------------------------------------------------------
# variants: legacy config, bf16, sharded, untied
# ------------------------------------------------------------------------------------------

def test_legacy_config_parses_like_v5_and_loads(tmp_path, tiny_dir):
    path = make_tiny(tmp_path / "legacy", config_style="legacy")
    raw = json.loads((path / "config.json").read_text())
    text, vision = raw["text_config"], raw["vision_config"]
    assert "rope_parameters" not in text and text["rope_theta"] == 5000000
    assert text["rope_scaling"] == {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"}
    assert vision["model_type"] == "qwen3_vl" and "rope_parameters" not in vision
    assert load_hf_config(path) == load_hf_config(tiny_dir)
    model, _ = _assert_loads_exactly(path)
    assert model.config.text_config.rope_parameters["mrope_section"] == [4, 2, 2]
    assert model.config.vision_config.model_type == "qwen3_vl_vision"
    # same seed, same weights, whatever the config style
    np.testing.assert_array_equal(Checkpoint.open(path).get(EMBED), Checkpoint.open(tiny_dir).get(EMBED))


def test_bf16_sharded_untied(tmp_path, tiny_dir):
    path = make_tiny(tmp_path / "variant", seed=0, dtype="bfloat16", tie_word_embeddings=False,
                     max_shard_bytes=8_000_000)
    files = sorted(p.name for p in path.iterdir() if "safetensors" in p.name)
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", INDEX_NAME]
    _, ckpt = _assert_loads_exactly(path)
    assert ckpt.dtype(EMBED) == "BF16" and "lm_head.weight" in ckpt
    assert not np.array_equal(ckpt.get("lm_head.weight"), ckpt.get(EMBED))
    fp32 = Checkpoint.open(tiny_dir).get(EMBED)
    np.testing.assert_allclose(ckpt.get(EMBED), fp32, rtol=2**-8, atol=0)  # bf16 of the same values
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert not load_hf_config(path).tie_word_embeddings


def test_seed_determinism(tmp_path, tiny_dir):
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    assert (again / SAFETENSORS_NAME).read_bytes() == (tiny_dir / SAFETENSORS_NAME).read_bytes()
    name = "model.visual.blocks.2.mlp.linear_fc1.weight"
    assert not np.array_equal(Checkpoint.open(other).get(name), Checkpoint.open(tiny_dir).get(name))


def test_make_tiny_is_quick(tmp_path):
    start = time.perf_counter()
    make_tiny(tmp_path / "quick", seed=3)
    assert time.perf_counter() - start < 15


# ------------------------------------------------------------------------------------------
# the 2b preset (shapes only: writing it takes a minute and 4.3 GB)
# ------------------------------------------------------------------------------------------

def test_2b_preset_shapes_without_writing():
    cfg = parse_hf_config(hf_config_dict("2b"))
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.vision.out_hidden_size) == (2048, 28, 2048)
    shapes = expected_parameter_shapes(cfg)
    assert sum(math.prod(s) for s in shapes.values()) == 2_127_532_032  #: 2.1275 B
    assert json.loads(json.dumps(hf_config_dict("2b")))["dtype"] == "bfloat16"


def test_4b_preset_is_qwen3_vl_4b_without_writing():
    """transformers' own Qwen3VLConfig and model (on the meta device: no memory) are the oracle."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    d = hf_config_dict("4b")
    config = Qwen3VLConfig.from_dict(d)
    t, v = config.text_config, config.vision_config
    # FACTS §2.2, Qwen3-VL-4B-Instruct
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size) == (2560, 36, 9728)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size) == (32, 8, 128, 151936)
    assert config.tie_word_embeddings and d["dtype"] == "bfloat16"
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads) == (24, 1024, 4096, 16)
    assert (v.out_hidden_size, list(v.deepstack_visual_indexes)) == (2560, [5, 11, 17])
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    theirs = {name: tuple(p.shape) for name, p in model.state_dict().items() if name != "lm_head.weight"}  # tied
    ours = expected_parameter_shapes(parse_hf_config(d))
    assert ours == theirs
    n = sum(math.prod(s) for s in ours.values())
    assert n == sum(p.numel() for p in model.parameters())
    assert round(n / 1e9, 4) == 4.4378  # FACTS §2.2: 4.4378 B (vision 415.3 M)
    assert round(sum(math.prod(s) for k, s in ours.items() if k.startswith("model.visual.")) / 1e6, 1) == 415.3


# ------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------

def test_refuses_to_overwrite_unless_asked(tmp_path):
    """A non-empty folder needs overwrite=True, which replaces only a checkpoint make_tiny wrote: a folder
    holding the user's own file is refused even then, the file kept."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError) as e:
        make_tiny(target)
    assert "--overwrite" in str(e.value) and (target / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError) as e:
        make_tiny(target, overwrite=True)
    assert "notes.txt" in str(e.value) and (target / "notes.txt").read_text() == "keep me"
    (target / "notes.txt").unlink()
    make_tiny(target)  # empty: allowed
    make_tiny(target, seed=1, overwrite=True)  # ours: replaced
    assert (target / SAFETENSORS_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "kwargs, word",
    [({"preset": "huge"}, "preset"), ({"dtype": "int8"}, "dtype"), ({"config_style": "4.50"}, "config_style"),
     ({"seed": -1}, "seed")],
)
def test_bad_arguments(tmp_path, kwargs, word):
    with pytest.raises(UserError) as e:
        make_tiny(tmp_path / "x", **kwargs)
    assert word in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())
