"""Named intermediate tensors: TransformerLens's `run_with_cache`, on an ONNX decoder.

    logits, cache = run_with_cache(model, "Describe Paris.")       # every hook point of every layer
    cache["layers.3.hidden"]                                        # (1, S, H) residual stream after layer 3
    cache.stack("attn_out")                                         # (L, 1, S, H) attention outputs, layer by layer
    logits, cache = run_with_cache(model, prompt, names=["layers.0.mlp_out"], tokens=[9707, 11])  # + teacher-forced

Hook points (the names our export gives these tensors, `export/decoder.py`):

    layers.{i}.attn_out   attention output of layer i, before the residual add      (B, S, H)
    layers.{i}.mlp_out    MLP output of layer i, before the residual add            (B, S, H)
    layers.{i}.hidden     residual stream after layer i (DeepStack added)           (B, S, H)
    final_norm            the last RMSNorm's output, what the lm_head reads         (B, S, H)
    attentions.{i}        attention probabilities (`export --with_attentions`)       (B, heads, S, T)

A tapped decoder is the same graph with those tensors added as outputs, in memory: the .onnx is parsed
without its weights and onnxruntime reads them from the folder's external-data files. Nothing is
copied or written. It is an `OnnxDecoder`, so `prefill`/`decode` work on it and each `Step.taps`
holds the taps of that call; `run_with_cache` is one prefill over the prompt (plus a teacher-forced
continuation) with every position's logits kept. The doctor (debug/layers.py) and notebooks read
taps this way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

from .decoder import OnnxDecoder, Step
from .errors import UserError
from .generate import Prompt, prepare_prompt
from .model import Model, edited_session
from .positions import next_positions

KINDS = ("attn_out", "mlp_out", "hidden")


def hook_points(model: Model) -> list[str]:
    """Every hook point name, in order: per layer attn_out, mlp_out, hidden; then final_norm."""
    n = model.config.text.num_hidden_layers
    return [f"layers.{i}.{k}" for i in range(n) for k in KINDS] + ["final_norm"]


class ActivationCache(dict):
    """name -> tensor, as TransformerLens's ActivationCache: `cache[name]`, `cache.stack(kind)`."""

    def stack(self, kind: str) -> np.ndarray:
        """(L, ...) the per-layer tensors of one kind ("attn_out", "mlp_out", "hidden"), layer 0 first."""
        found = sorted(((int(k.split(".")[1]), v) for k, v in self.items()
                        if k.startswith("layers.") and k.endswith(f".{kind}")), key=lambda kv: kv[0])
        if not found:
            raise UserError(f"the cache holds no '{kind}' taps; run_with_cache with names including layers.N.{kind}")
        return np.stack([v for _, v in found])


class TappedDecoder(OnnxDecoder):
    """The teaching decoder with named intermediate tensors added as outputs (those the graph has)."""

    def __init__(self, model: Model, names: Sequence[str] | None = None):
        graph = model.graph()
        produced = {o for n in graph.graph.node for o in n.output}
        existing = {o.name for o in graph.graph.output}
        wanted = hook_points(model) if names is None else list(names)
        self.tapped = [n for n in wanted if n in produced or n in existing]
        self.not_found = [n for n in wanted if n not in self.tapped]
        for name in self.tapped:
            if name not in existing:
                graph.graph.output.append(onnx.ValueInfoProto(name=name))  # type/shape left to onnxruntime
        super().__init__(edited_session(model, graph), model.config.text, model.embed,
                         accept_missing=model.accept_missing, where=str(model.folder))


def extend_prompt(model: Model, prompt: Prompt, tokens: Sequence[int] | None) -> Prompt:
    """Prompt + a teacher-forced continuation as ONE prompt: ids (1, S+T), embeddings, positions, DeepStack."""
    if tokens is None or len(tokens) == 0:
        return prompt
    ids = np.asarray(tokens, np.int64).reshape(1, -1)  # (1, T)
    n = ids.shape[1]
    more = next_positions(np.ones((1, prompt.length + n), np.int64), prompt.positions.rope_deltas, n)  # (3, 1, T)
    deepstack = prompt.deepstack
    if deepstack is not None:
        deepstack = np.concatenate([deepstack, np.zeros((*deepstack.shape[:2], n, deepstack.shape[3]), np.float32)], 2)
    return Prompt(np.concatenate([prompt.input_ids, ids], 1), np.concatenate([prompt.inputs_embeds, model.embed(ids)], 1),
                  type(prompt.positions)(np.concatenate([prompt.positions.position_ids, more], 2),
                                         prompt.positions.rope_deltas), deepstack)


def run_with_cache(model: Model, prompt: str | Prompt, names: Sequence[str] | None = None,
                   tokens: Sequence[int] | None = None, *, decoder: TappedDecoder | None = None
                   ) -> tuple[np.ndarray, ActivationCache]:
    """One prefill over the prompt (+ `tokens`, teacher-forced) -> (logits (1, S+T, V), ActivationCache).

    names: hook points to keep (default: all of `hook_points(model)`); names the graph lacks are left
    out (`decoder.not_found` lists them). Pass `decoder` to reuse one tapped session across prompts."""
    decoder = decoder or TappedDecoder(model, names)
    p = prepare_prompt(model, prompt) if isinstance(prompt, str) else prompt
    p = extend_prompt(model, p, tokens)
    step: Step = decoder.prefill(decoder.new_cache(p.input_ids.shape[0]), p.inputs_embeds,
                                 p.positions.position_ids, input_ids=p.input_ids, attention_mask=p.attention_mask,
                                 deepstack=p.deepstack, logits_to_keep=0)
    cache = ActivationCache(step.taps)
    for i, a in enumerate(step.attentions or ()):
        cache[f"attentions.{i}"] = a
    return step.logits, cache


__all__ = ["ActivationCache", "KINDS", "TappedDecoder", "extend_prompt", "hook_points", "run_with_cache"]
