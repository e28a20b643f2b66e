"""Notebook 06's exercise: head detectors, as in ARENA's induction-heads chapter -- a score per head for "looks at
the previous token" and for "looks at the first token (the attention sink)".

    from qwen3vl_lab.apps.lessons import attention as lesson
    lesson.check_previous_token_score(my_fn)    # where it differs, with a hint
    lesson.check_sink_score(my_fn)
    lesson.previous_token_score, lesson.sink_score   # the reference solutions

Both take one layer's prefill attention, (heads, S, S) probabilities (rows sum to 1, causal), and return one
score per head (heads,): the attention each query q = 1 .. S-1 pays to key q - 1 (previous token) or to key 0
(the first token), averaged over those queries. Query 0 is left out: it can only look at itself.
The check's oracle: patterns whose scores are known by construction (a pure previous-token head scores 1, a
uniform causal head 1/q on average, ...), and np.diagonal for random causal patterns.

`ablate_heads(folder, out, [(layer, head)])` is the notebook's experiment: a copy of an fp32 export whose
decoder multiplies the named heads' outputs by zero before o_proj (the attention output (B, S, heads *
head_dim) is a concatenation of the heads, so zeroing a head's head_dim columns removes exactly its
contribution); nothing else changes, the weight files are hard-linked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import UserError
from ...export.cache import build_once
from ...export.quantize import link_or_copy
from ...layout import DECODER_FILE
from ...layouts import read_export_config
from .grading import first_difference, graded, mismatch


# -- the reference solutions -----------------------------------------------------------------------
def previous_token_score(attn: np.ndarray) -> np.ndarray:
    """(heads, S, S) -> (heads,): mean over queries q >= 1 of attn[h, q, q - 1]."""
    S = attn.shape[-1]
    q = np.arange(1, S)
    return attn[:, q, q - 1].mean(axis=-1)


def sink_score(attn: np.ndarray) -> np.ndarray:
    """(heads, S, S) -> (heads,): mean over queries q >= 1 of attn[h, q, 0]."""
    return attn[:, 1:, 0].mean(axis=-1)


# -- patterns with known scores --------------------------------------------------------------------
def _pure_previous(S: int) -> np.ndarray:
    a = np.zeros((S, S), np.float32)
    a[0, 0] = 1.0
    a[np.arange(1, S), np.arange(S - 1)] = 1.0
    return a


def _pure_sink(S: int) -> np.ndarray:
    a = np.zeros((S, S), np.float32)
    a[:, 0] = 1.0
    return a


def _pure_self(S: int) -> np.ndarray:
    return np.eye(S, dtype=np.float32)


def _uniform(S: int) -> np.ndarray:
    return np.tril(np.ones((S, S), np.float32)) / np.arange(1, S + 1, dtype=np.float32)[:, None]


def _random_causal(S: int, heads: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(heads, S, S)) * 3
    x = np.where(np.tril(np.ones((S, S), bool)), x, -np.inf)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _known_cases(S: int = 7):
    """(name, attention (4, S, S), previous-token scores, sink scores): heads = previous, sink, self, uniform."""
    attn = np.stack([_pure_previous(S), _pure_sink(S), _pure_self(S), _uniform(S)])
    uniform = float(np.mean(1 / np.arange(2, S + 1)))  # query q spreads over q + 1 keys: 1 / (q + 1) on each
    first_prev = 1.0 / (S - 1)  # the sink head's query 1: its first token IS its previous token
    prev = np.array([1.0, first_prev, 0.0, uniform])
    sink = np.array([first_prev, 1.0, 0.0, uniform])
    return attn, prev, sink


def _hint(kind: str, got: np.ndarray, attn: np.ndarray) -> str:
    S = attn.shape[-1]
    if got.shape != (attn.shape[0],):
        return "return one score per head: shape (heads,) -- average over the queries, not over the heads"
    with_query0 = (np.diagonal(attn, -1, 1, 2).sum(-1) / S if kind == "previous" else attn[:, :, 0].mean(-1))
    if np.allclose(got, with_query0, atol=1e-6):
        return "leave query 0 out: it can only attend to itself, so it says nothing about the head (average over S - 1 queries)"
    if kind == "previous" and np.allclose(got, np.diagonal(attn, 1, 1, 2).mean(-1), atol=1e-6):
        return "that is the diagonal above the main one (always 0 in a causal pattern): the previous token is key q - 1"
    if kind == "previous" and np.allclose(got, np.diagonal(attn, 0, 1, 2)[:, 1:].mean(-1), atol=1e-6):
        return "that is attention to the token itself (key q); the previous token is key q - 1"
    if kind == "sink" and np.allclose(got, attn[:, 0, 1:].mean(-1), atol=1e-6):
        return "rows are queries, columns keys: the first token as a key is column 0, attn[:, q, 0]"
    return ("rows are queries, columns are keys; for each query q >= 1 take attn[h, q, q - 1] (previous token) "
            "or attn[h, q, 0] (first token), then average over the queries")


def _run(kind: str, student_fn, reference_of) -> None:
    attn, prev, sink = _known_cases()
    want = prev if kind == "previous" else sink
    cases = [("four made-up heads (pure previous-token, pure first-token, self, uniform), 7 tokens", attn, want)]
    rnd = _random_causal(11, 3, seed=6)
    cases.append(("three random causal heads, 11 tokens", rnd, reference_of(rnd)))
    for where, a, w in cases:
        got = np.asarray(student_fn(a.copy()), np.float64)
        if got.shape != w.shape:
            raise mismatch(f"{where}: shape", got.shape, w.shape, _hint(kind, got, a))
        i = first_difference(got, w, atol=1e-5)
        if i is not None:
            raise mismatch(f"{where}: head {i}", got, w, _hint(kind, got, a))


def _diagonal_previous(a: np.ndarray) -> np.ndarray:
    return np.diagonal(a, -1, 1, 2).mean(-1)  # keys q - 1 of queries 1 .. S-1


def check_previous_token_score(student_fn) -> bool:
    """student_fn(attn (heads, S, S)) -> (heads,) previous-token scores."""
    return graded("previous_token_score", student_fn, lambda fn: _run("previous", fn, _diagonal_previous))


def check_sink_score(student_fn) -> bool:
    """student_fn(attn (heads, S, S)) -> (heads,) first-token (sink) scores."""
    return graded("sink_score", student_fn, lambda fn: _run("sink", fn, lambda a: a[:, 1:, 0].sum(-1) / (a.shape[-1] - 1)))


# -- the ablation --------------------------------------------------------------------------------
def _o_proj(graph: onnx.GraphProto, layer: int) -> onnx.NodeProto:
    """The MatMul whose weight is layer `layer`'s self_attn.o_proj (its input: the heads, concatenated)."""
    inits = {t.name for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and f"layers.{layer}.self_attn.o_proj" in n.input[1]:
            return n
    raise UserError(f"no o_proj MatMul for layer {layer} in the decoder; pass an fp32 export made by qwen3vl-lab")


def _mask_heads(graph: onnx.GraphProto, layer: int, heads: Sequence[int], n_heads: int, head_dim: int) -> None:
    """Insert Mul(attention output, mask) before layer's o_proj: mask is 0 on the heads' columns, 1 elsewhere."""
    node = _o_proj(graph, layer)
    mask = np.ones(n_heads * head_dim, np.float32)  # (heads * head_dim,)
    for h in heads:
        mask[h * head_dim:(h + 1) * head_dim] = 0.0
    name = f"ablate/layers.{layer}"
    graph.initializer.append(numpy_helper.from_array(mask, f"{name}/mask"))
    graph.node.insert(list(graph.node).index(node), helper.make_node("Mul", [node.input[0], f"{name}/mask"],
                                                                     [f"{name}/heads"], name=f"{name}/Mul"))
    node.input[0] = f"{name}/heads"


def ablate_heads(fp32_folder: str | Path, out_dir: str | Path, heads: Sequence[tuple[int, int]]) -> Path:
    """A copy of the precision folder `fp32_folder` (e.g. OUT/cpu-fp32) whose decoder zeroes each (layer, head)'s
    output; built once into out_dir/<heads>-<hash of the source graph>, reused after. Returns the folder."""
    src = Path(fp32_folder)
    cfg = read_export_config(src)["qwen3vl_lab"]["config"]["text"]
    n_heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["head_dim"])
    heads = sorted({(int(layer), int(h)) for layer, h in heads})
    bad = [(layer, h) for layer, h in heads if not (0 <= layer < int(cfg["num_hidden_layers"]) and 0 <= h < n_heads)]
    if bad or not heads:
        raise UserError(f"heads {bad or heads} must be (layer, head) pairs within {cfg['num_hidden_layers']} layers "
                        f"and {n_heads} heads")
    key = hashlib.sha256((src / DECODER_FILE).read_bytes()).hexdigest()[:12]
    slug = "-".join(f"L{layer}H{h}" for layer, h in heads)

    def build(tmp: Path) -> None:
        for f in src.iterdir():
            if f.is_file() and f.name != DECODER_FILE:
                link_or_copy(f, tmp / f.name, link=True)
        model = onnx.load(str(src / DECODER_FILE), load_external_data=False)
        for layer in sorted({layer for layer, _ in heads}):
            _mask_heads(model.graph, layer, [h for lay, h in heads if lay == layer], n_heads, head_dim)
        onnx.save_model(model, str(tmp / DECODER_FILE))

    return build_once(Path(out_dir) / f"ablate-{slug}-{key}", build)


__all__ = ["ablate_heads", "check_previous_token_score", "check_sink_score", "previous_token_score", "sink_score"]
