"""The ONNX pipeline computes what transformers' PyTorch Qwen3-VL computes (minGPT-style equivalence).

For text prompts (ASCII and CJK/emoji): prefill logits at every position and >= 10 decode-step
logits agree within 1e-4, greedy tokens are identical to transformers' `generate`, and our 3-D
position ids equal transformers' `get_rope_index`. Checkpoint variants: the Hub's legacy config
style, bf16 weights, sharded weights, an untied lm_head, and a deeper config with q_proj != hidden.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qwen3vl_lab.export.exporter import export  # noqa: E402
from qwen3vl_lab.export.tiny import make_tiny  # noqa: E402
from qwen3vl_lab.generate import generate_tokens, prepare_ids  # noqa: E402
from qwen3vl_lab.model import load_model  # noqa: E402
from qwen3vl_lab.pipeline import greedy  # noqa: E402
from qwen3vl_lab.steps import build_positions, decode_step, embed, prefill, tokenize  # noqa: E402

PROMPTS = ["Hello, who are you?", "你好，世界！🌍🚀 こんにちは — naïve café"]
N_NEW = 12
TOL = 1e-4


def _export(ckpt, tmp_path_factory, name):
    out = tmp_path_factory.mktemp("onnx") / name
    export(ckpt, out, progress=False, log=lambda _: None)
    return load_model(out)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir, tmp_path_factory):
    return _export(tiny_dir, tmp_path_factory, "tiny")


def hf_reference(hf, ids: np.ndarray, n_new: int):
    """transformers: full-sequence prefill logits, greedy tokens and each decode step's logits."""
    hf.model.rope_deltas = None
    with torch.no_grad():
        prefill_logits = hf(input_ids=torch.tensor(ids)).logits[0].numpy()  # (S, V)
        hf.model.rope_deltas = None
        out = hf.generate(torch.tensor(ids), max_new_tokens=n_new, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=151643)
    tokens = out.sequences[0, ids.shape[1]:].numpy()
    step_logits = np.stack([l[0].numpy() for l in out.logits])  # (n_new, V): logits that chose each token
    return prefill_logits, tokens, step_logits


def onnx_run(model, ids: np.ndarray, forced: np.ndarray):
    """Our step functions, teacher-forced on transformers' tokens: prefill logits + each step's logits."""
    positions = build_positions(ids)
    step = prefill(model, embed(model, ids), positions, logits_to_keep=0)
    prefill_logits = step.logits[0]  # (S, V)
    step_logits = [prefill_logits[-1]]
    for tok in forced[:-1]:
        step = decode_step(model, np.array([[tok]]), step.cache, positions.rope_deltas)
        step_logits.append(step.logits[0])
    return prefill_logits, np.stack(step_logits), step.cache


def check_parity(model, hf, prompt):
    ids = tokenize(model, prompt)
    ref_prefill, ref_tokens, ref_steps = hf_reference(hf, ids, N_NEW)
    ours_prefill, ours_steps, cache = onnx_run(model, ids, ref_tokens)
    assert np.abs(ours_prefill - ref_prefill).max() <= TOL
    assert len(ref_steps) >= 11
    assert np.abs(ours_steps - ref_steps).max() <= TOL
    ours_tokens = list(generate_tokens(model, prepare_ids(model, ids), greedy, N_NEW, eos_token_ids=[]))
    assert ours_tokens == ref_tokens.tolist()
    assert cache.length == ids.shape[1] + N_NEW - 1
    return ours_tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tiny_logits_and_greedy_tokens_match_transformers(tiny_model, tiny_dir, hf_model_factory, prompt):
    tokens = check_parity(tiny_model, hf_model_factory(tiny_dir), prompt)
    assert len(set(tokens)) > 1, "the tiny checkpoint should not repeat one token forever"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_text_positions_equal_get_rope_index(tiny_model, tiny_dir, hf_model_factory, prompt):
    ids = tokenize(tiny_model, prompt)
    hf = hf_model_factory(tiny_dir)
    ref_pos, ref_delta = hf.model.get_rope_index(torch.tensor(ids), mm_token_type_ids=torch.zeros_like(torch.tensor(ids)))
    ours = build_positions(ids)
    np.testing.assert_array_equal(ours.position_ids, ref_pos.numpy())
    np.testing.assert_array_equal(ours.rope_deltas, ref_delta.numpy().reshape(ours.rope_deltas.shape))
    assert (ours.position_ids[0] == ours.position_ids[1]).all() and (ours.position_ids[1] == ours.position_ids[2]).all()


VARIANTS = {
    "legacy-config": dict(config_style="legacy"),
    "bf16": dict(dtype="bfloat16"),
    "sharded": dict(max_shard_bytes=8 * 2**20),
    "untied": dict(tie_word_embeddings=False),
    "tiny-deep": dict(preset="tiny-deep"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_variants_match_transformers(variant, tmp_path_factory, hf_model_factory):
    ckpt = make_tiny(tmp_path_factory.mktemp("ckpt") / variant, seed=3, **VARIANTS[variant])
    model = _export(ckpt, tmp_path_factory, variant)
    check_parity(model, hf_model_factory(ckpt), PROMPTS[0])


def test_untied_head_is_not_the_embedding(tmp_path_factory, hf_model_factory):
    """An untied checkpoint's logits come from lm_head.weight: the tied head would give other logits."""
    ckpt = make_tiny(tmp_path_factory.mktemp("ckpt") / "untied2", seed=4, tie_word_embeddings=False)
    model = _export(ckpt, tmp_path_factory, "untied2")
    hf = hf_model_factory(ckpt)
    w_head, w_emb = hf.lm_head.weight.detach().numpy(), hf.model.language_model.embed_tokens.weight.detach().numpy()
    assert not np.allclose(w_head, w_emb)
    ids = tokenize(model, PROMPTS[0])
    ours = prefill(model, embed(model, ids), build_positions(ids)).logits[0]
    hf.model.rope_deltas = None
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits[0, -1].numpy()
    assert np.abs(ours - ref).max() <= TOL


def test_cached_decoding_equals_recomputing_the_sequence(tiny_model):
    """KV caching is exact: the logits of a decode step equal a full forward over the whole sequence."""
    ids = tokenize(tiny_model, PROMPTS[0])
    positions = build_positions(ids)
    step = prefill(tiny_model, embed(tiny_model, ids), positions)
    extra = []
    for _ in range(5):
        tok = int(step.logits[0].argmax())
        extra.append(tok)
        step = decode_step(tiny_model, np.array([[tok]]), step.cache, positions.rope_deltas)
    full = np.concatenate([ids, np.array([extra])], axis=1)
    again = prefill(tiny_model, embed(tiny_model, full), build_positions(full))
    assert np.abs(again.logits - step.logits).max() <= 1e-4
    assert [r.kind for r in step.cache.history] == ["prefill"] + ["decode"] * 5
    assert [r.length for r in step.cache.history] == list(range(ids.shape[1], ids.shape[1] + 6))
