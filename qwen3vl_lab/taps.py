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

On graphs built by onnxruntime-genai's model builder (the original guide's export, its own Qwen3-VL
decoder) the same hook points are found by structure (`skip_norm_hook_points`): the residual stream
runs through SkipSimplifiedLayerNormalization nodes, two per layer; the block output each one adds
is attn_out / mlp_out, and their input+skip sum (4th output) is the residual stream. The last
layer's sum is not an output of the final norm there, so it is named in the in-memory copy.
`TappedDecoder` returns the canonical names either way (`decoder.tensors` says which tensor each is).

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


# -- hook points on graphs built by others ----------------------------------------------------------
SKIP_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
SKIP_SUM = 3  # Skip*LayerNormalization's optional 4th output: input + skip (+ bias), i.e. the residual stream


def residual_chain(graph: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Skip*LayerNormalization nodes along the residual stream, first to last (each takes the previous
    one's input+skip sum as its residual input); [] when the graph has none or they do not form one chain.

    In an onnxruntime-genai decoder of L layers there are 2L: per layer the post-attention norm (adds
    attn_out), then the next layer's input norm, or the final norm after the last layer (adds mlp_out)."""
    skips = [n for n in graph.graph.node if n.op_type in SKIP_NORMS]
    by_sum = {n.output[SKIP_SUM]: n for n in skips if len(n.output) > SKIP_SUM and n.output[SKIP_SUM]}
    after: dict[str, onnx.NodeProto] = {}  # a node's name -> the chain node that reads its sum
    starts = []
    for n in skips:
        prev = [by_sum[i] for i in n.input[:2] if i in by_sum]
        if len(prev) > 1 or (prev and prev[0].name in after):
            return []  # not one chain
        if prev:
            after[prev[0].name] = n
        else:
            starts.append(n)
    if len(starts) != 1:
        return []
    chain = [starts[0]]
    while chain[-1].name in after:
        chain.append(after[chain[-1].name])
    return chain if len(chain) == len(skips) else []


def _added(node: onnx.NodeProto, residual: str) -> str:
    """The block output a chain node adds to the residual stream: its input other than `residual`."""
    a, b = node.input[0], node.input[1]
    return b if a == residual else a


def skip_norm_hook_points(graph: onnx.ModelProto, num_layers: int) -> dict[str, str]:
    """Canonical hook point -> tensor, on a decoder whose residual stream runs through Skip*LayerNormalization
    (onnxruntime-genai's builder); {} when the graph is not built that way or has another layer count.

        layers.{i}.attn_out   the block output the post-attention norm of layer i adds (o_proj's output)
        layers.{i}.mlp_out    the block output the next norm adds (down_proj's output)
        layers.{i}.hidden     that next norm's input+skip sum (4th output)
        final_norm            the last norm's normalized output (what the lm_head reads)

    The first chain node's residual is its first input (the op's `input`; the builder passes the
    embeddings there). Edits `graph` in place: the final norm's sum is named `layers.{L-1}.hidden` when
    the graph does not produce it (an optional output; pass an in-memory copy)."""
    chain = residual_chain(graph)
    if len(chain) != 2 * num_layers:
        return {}
    last = chain[-1]
    if len(last.output) <= SKIP_SUM or not last.output[SKIP_SUM]:
        last.output.extend([""] * (SKIP_SUM - len(last.output)) + [f"layers.{num_layers - 1}.hidden"])
    out: dict[str, str] = {}
    residual = chain[0].input[0]
    for i in range(num_layers):
        post_attn, post_mlp = chain[2 * i], chain[2 * i + 1]
        out[f"layers.{i}.attn_out"] = _added(post_attn, residual)
        out[f"layers.{i}.mlp_out"] = _added(post_mlp, post_attn.output[SKIP_SUM])
        out[f"layers.{i}.hidden"] = residual = post_mlp.output[SKIP_SUM]
    out["final_norm"] = last.output[0]
    return out


def tap_tensors(graph: onnx.ModelProto, names: Sequence[str], num_layers: int) -> dict[str, str]:
    """name -> the graph tensor that holds it, for the names found: a tensor of that name (our exports
    name the hook points so), else the hook point found by structure (`skip_norm_hook_points`).
    May edit `graph` (see there): pass an in-memory copy."""
    produced = {o for n in graph.graph.node for o in n.output} | {o.name for o in graph.graph.output}
    out = {n: n for n in names if n in produced}
    if len(out) < len(names):
        found = skip_norm_hook_points(graph, num_layers)
        out.update({n: found[n] for n in names if n not in out and n in found})
    return out


class TappedDecoder(OnnxDecoder):
    """The teaching decoder with named intermediate tensors added as outputs (those the graph has).

    `tensors`: hook point -> the graph tensor read for it; `tapped`: the names found; `not_found`: the rest."""

    def __init__(self, model: Model, names: Sequence[str] | None = None):
        graph = model.graph()
        existing = {o.name for o in graph.graph.output}
        wanted = hook_points(model) if names is None else list(names)
        self.tensors = tap_tensors(graph, wanted, model.config.text.num_hidden_layers)
        self.tapped = [n for n in wanted if n in self.tensors]
        self.not_found = [n for n in wanted if n not in self.tensors]
        self._added = {t for t in self.tensors.values() if t not in existing}
        for tensor in dict.fromkeys(self.tensors.values()):
            if tensor in self._added:
                graph.graph.output.append(onnx.ValueInfoProto(name=tensor))  # type/shape left to onnxruntime
        super().__init__(edited_session(model, graph), model.config.text, model.embed,
                         accept_missing=model.accept_missing, where=str(model.decoder_file))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's outputs, the taps under their hook-point names."""
        out = super().run(feeds)
        taps = {name: out[tensor] for name, tensor in self.tensors.items()}
        return {**{k: v for k, v in out.items() if k not in self._added}, **taps}


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
    embeds = None if prompt.inputs_embeds is None else np.concatenate([prompt.inputs_embeds, model.embed(ids)], 1)
    return Prompt(np.concatenate([prompt.input_ids, ids], 1), embeds,
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


__all__ = ["ActivationCache", "KINDS", "TappedDecoder", "extend_prompt", "hook_points", "residual_chain", "run_with_cache",
           "skip_norm_hook_points", "tap_tensors"]
