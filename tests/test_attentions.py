"""The decoder's own attention outputs (`export --with_attentions`) equal transformers' output_attentions.

The export goes through the CLI (`python -m qwen3vl_lab export --with_attentions`). For a prefill
and for decode steps with the KV cache, every layer's `attentions.{i}` (B, heads, S, T) agrees with
transformers' eager attention probabilities within 1e-4, on two tiny configs (4 heads / 2 kv heads,
and 8 heads / 2 kv heads with head_dim 32).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qwen3vl_lab.model import load_model  # noqa: E402
from qwen3vl_lab.steps import build_positions, decode_step, embed, prefill, tokenize  # noqa: E402

TOL = 1e-4
PROMPT = "Hello, who are you? Tell me about attention."
N_DECODE = 3


def cli_export(hf_dir, out) -> None:
    """`qwen3vl-lab export --with_attentions` as a user runs it."""
    cmd = [sys.executable, "-m", "qwen3vl_lab", "export", "--hf_dir", str(hf_dir), "--output_dir", str(out),
           "--with_attentions", "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "exported fp32" in run.stdout


@pytest.fixture(scope="module", params=["tiny", "tiny-deep"])
def case(request, tiny_dir, tiny_deep_dir, tmp_path_factory, hf_model_factory):
    hf_dir = tiny_dir if request.param == "tiny" else tiny_deep_dir
    out = tmp_path_factory.mktemp("onnx-attn") / request.param
    cli_export(hf_dir, out)
    return load_model(out), hf_model_factory(hf_dir), out


def test_cli_export_adds_attention_outputs(case):
    model, _, out = case
    n, heads = model.config.text.num_hidden_layers, model.config.text.num_attention_heads
    outputs = {o.name: o.shape for o in model.decoder.get_outputs()}
    for i in range(n):
        assert outputs[f"attentions.{i}"][1] == heads
    own = json.loads((out / "cpu-fp32" / "qwen3vl_lab.json").read_text())
    assert own["with_attentions"] is True


def hf_attentions(hf, ids: np.ndarray, forced: list[int]):
    """transformers' eager attention probabilities: prefill, then one forward per forced token with the cache."""
    hf.model.rope_deltas = None
    S = ids.shape[1]
    steps = []
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), use_cache=True, output_attentions=True)
        steps.append([a.numpy() for a in out.attentions])
        cache = out.cache
        for k, tok in enumerate(forced):
            pos = torch.full((3, 1, 1), S + k, dtype=torch.long)  # text only: rope delta 0
            out = hf(input_ids=torch.tensor([[tok]]), cache=cache, position_ids=pos, use_cache=True,
                     output_attentions=True)
            steps.append([a.numpy() for a in out.attentions])
            cache = out.cache
    return steps


def onnx_attentions(model, ids: np.ndarray):
    """Our step functions: prefill, then N_DECODE greedy decode steps; every step's attentions."""
    positions = build_positions(ids)
    step = prefill(model, embed(model, ids), positions)
    steps, forced = [step.attentions], []
    for _ in range(N_DECODE):
        tok = int(step.logits[0].argmax())
        forced.append(tok)
        step = decode_step(model, np.array([[tok]]), step.cache, positions.rope_deltas)
        steps.append(step.attentions)
    return steps, forced


def test_attentions_equal_transformers_prefill_and_decode(case):
    model, hf, _ = case
    ids = tokenize(model, PROMPT)
    S = ids.shape[1]
    ours, forced = onnx_attentions(model, ids)
    ref = hf_attentions(hf, ids, forced)
    n, heads = model.config.text.num_hidden_layers, model.config.text.num_attention_heads
    assert len(ours) == len(ref) == N_DECODE + 1
    for k, (o_step, r_step) in enumerate(zip(ours, ref)):
        q, T = (S, S) if k == 0 else (1, S + k)
        assert len(o_step) == len(r_step) == n
        for layer, (o, r) in enumerate(zip(o_step, r_step)):
            assert o.shape == r.shape == (1, heads, q, T), (k, layer, o.shape, r.shape)
            err = np.abs(o - r).max()
            assert err <= TOL, f"step {k} layer {layer}: max |diff| {err:.2e}"
    prefill0 = ours[0][0][0]  # (heads, S, S)
    np.testing.assert_allclose(prefill0.sum(-1), 1.0, atol=1e-5)  # rows are probabilities
    assert np.abs(np.triu(prefill0, k=1)).max() == 0.0  # causal: nothing attends to the future
    assert not np.allclose(prefill0[0], prefill0[1]), "heads should differ on a random checkpoint"
