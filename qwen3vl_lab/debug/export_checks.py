"""Checks of what an export has, measured by running it: for any decoder, ours or another tool's.

    kv_cache     decoding with the cache gives the logits of recomputing the whole sequence on the same
                 decoder (the third cause of gibberish: a corrupt cache; measured, not read from the graph),
                 judged against the tested model's own quantization noise when the fp32 answer is at hand
    graph_opt    the logits at onnxruntime's ORT_ENABLE_ALL equal those at ORT_DISABLE_ALL (a fusion that
                 miscomputes, or a QDQ MatMul fused into an int8-activation MatMulNBits: onnxsim#749)
    mrope        the decoder rotates image tokens with Qwen3-VL's interleaved MRoPE channels, not Qwen2.5-VL's
                 blocked sections (invisible on text, breaks images: alibaba/MNN PR #4133)
    image_probe  one image prompt through the reference and through the tested decoder, and through the
                 reference without each piece (1-D positions, no DeepStack): which pieces the answer needs
    algorithm    the quantization recipe the export records (bits, block, symmetric, accuracy_level, algorithm)

Each returns a `CheckItem` (checklist.py) with its evidence. The image probe needs a reference with a vision
graph (our export of the same checkpoint); the tested decoder is run with `accept_missing`, and what it
lacked is named in the evidence. The reference's side (`probe_reference`, `answer_probe`) can run first and
alone: the doctor records it, releases the reference, then checks the tested decoder against the record.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort

from ..config import TextConfig
from ..decoder import OnnxDecoder
from ..generate import Prompt, generate_step, prepare_multimodal_prompt, prepare_prompt
from ..model import Model, inspection_options
from ..positions import Positions
from ..rope import mrope_inv_freq_by_axis
from ..sampling import forced, greedy
from .checkitem import CheckItem, attrs
from .compare import kl_divergence
from .layers import accuracy_level_decoder

# nats: cached and recomputed next-token distributions agree to kernel rounding. fp32 agrees to ~1e-12; an INT4
# decoder's prefill and decode kernels differ more (measured 5.5e-4 at 2B dims, top-1 still identical), while a
# corrupted cache moves the distribution by far more than 1e-2 and changes the argmax.
KV_KL_TOL = 1e-2
# A quantized model's prefill and decode kernels round differently, and activation outliers amplify that (the
# outlier teaching model at INT4: max KL 0.04 with every top-1 equal). The cache is judged wiring-broken only when
# cached and recomputed differ by more than this share of what quantization itself moves at the same positions
# (the tested model vs fp32): kernel rounding is a fraction of the quantization error, a swapped cache is not.
KV_NOISE_SHARE = 0.5
ANSWER_STEPS = 16  # the reference's greedy answer tokens the accuracy_level, KV and graph-optimization checks run on
CHECK_PROMPT = "Write a haiku about the sea."
GRAPH_OPT_KL_TOL = 1e-3  # nats: fusions reorder float sums (~1e-6 of a logit); an answer-changing rewrite moves far more
PROBE_QUESTION = "Describe the image."
PROBE_KL_MATTERS = 1e-3  # nats: a piece "matters" when leaving it out moves the next-token distribution more


def _prefill_all(model: Model, p: Prompt, *, deepstack=True, one_d: bool = False,
                 decoder: OnnxDecoder | None = None) -> np.ndarray:
    """(S, V) logits of every position of one prefill (the teaching decoder, or `decoder`; missing pieces accepted)."""
    dec = decoder if decoder is not None else model.teaching_decoder
    pos = p.positions.position_ids
    if one_d:
        pos = np.broadcast_to(pos[:1], pos.shape).copy()  # what a 1-D rotary sees: the t row everywhere
        pos[:] = np.arange(pos.shape[-1])  # text-style numbering 0..S-1, as the guide's decoder counts
    accept, dec.accept_missing = dec.accept_missing, True
    try:
        step = dec.prefill(dec.new_cache(p.input_ids.shape[0]), p.inputs_embeds, pos, input_ids=p.input_ids,
                           attention_mask=p.attention_mask, deepstack=p.deepstack if deepstack else None,
                           logits_to_keep=0)
    finally:
        dec.accept_missing = accept
    return step.logits[0]


@dataclass
class AnswerProbe:
    """A text prompt and a greedy answer to it: the sequence the accuracy_level, KV-cache and graph-optimization
    checks run the tested decoder on. Made by the fp32 reference (`logits` kept: its next-token distributions
    at the answer positions, a few MB, so the reference can be released first), or by the tested model itself
    when no reference is at hand (`logits` None: nothing to measure quantization noise against)."""

    text: str
    ids: np.ndarray  # (1, S + n) the prompt's ids, then the n answer tokens
    n: int
    logits: np.ndarray | None  # (n, V) the reference's logits that chose the answer tokens; None: the model's own answer

    @property
    def tokens(self) -> np.ndarray:
        return self.ids[0, -self.n:]  # (n,)


def answer_probe(model: Model, text: str = CHECK_PROMPT, n: int = ANSWER_STEPS, *, keep_logits: bool = True) -> AnswerProbe:
    """`model`'s greedy answer to `text` (n tokens, no stop at end-of-sequence), decoded with its cache."""
    p = prepare_prompt(model, text)
    records = list(generate_step(model, p, greedy, n, eos_token_ids=[]))
    tokens = np.array([int(r.tokens[0]) for r in records], np.int64)  # (n,)
    logits = np.stack([r.logits[0].copy() for r in records]) if keep_logits else None  # (n, V)
    return AnswerProbe(text, np.concatenate([p.input_ids, tokens[None]], axis=1), n, logits)


def text_prompt(model: Model, ids: np.ndarray) -> Prompt:
    """Text token ids (1, S) as a prompt: `model`'s own embeddings (when its decoder takes them), positions 0..S-1."""
    S = ids.shape[1]
    return Prompt(ids, model.embed(ids) if model.embedding is not None else None,
                  Positions(np.broadcast_to(np.arange(S), (3, 1, S)).copy(), np.zeros((1, 1), np.int64)))


def answer_logits(model: Model, probe: AnswerProbe, decoder: OnnxDecoder | None = None) -> np.ndarray:
    """(n, V) the logits at the probe's answer positions, from one prefill over prompt + answer (teacher forced)."""
    return _prefill_all(model, text_prompt(model, probe.ids[:, :-1]), decoder=decoder)[-probe.n:]


def _cache_gap(model: Model, probe: AnswerProbe, decoder: OnnxDecoder | None = None):
    """Cached decode vs one prefill of the probe's answer: KL per step (n,), top-1 agreement, max |logit diff|, and
    the recomputed logits (n, V)."""
    p = text_prompt(model, probe.ids[:, :-probe.n])
    records = list(generate_step(model, p, forced(probe.tokens), probe.n, decoder=decoder, eos_token_ids=[]))
    cached = np.stack([r.logits[0].copy() for r in records])  # (n, V)
    recomputed = answer_logits(model, probe, decoder)  # (n, V)
    kl = kl_divergence(recomputed, cached)  # (n,)
    return kl, float(np.mean(recomputed.argmax(-1) == cached.argmax(-1))), float(np.abs(recomputed - cached).max()), \
        recomputed


def check_kv_cache(model: Model, probe: AnswerProbe | None = None):
    """Decode the probe's answer with the cache (teacher forced), then recompute the whole sequence in one prefill.

    probe: the fp32 reference's answer (`answer_probe(reference)`): the difference is then judged against what
    quantization itself moves at the same positions; None: the tested model's own answer, fixed tolerance. A graph
    with accuracy_level 4 that misses the tolerance is run again rewritten to level 0 (same graph, same weights):
    its decode (one row, int8 activations) and prefill kernels round differently, the wiring is the same."""
    title = "KV cache consistent"
    probe = probe if probe is not None else answer_probe(model, keep_logits=False)
    kl, agree, diff, recomputed = _cache_gap(model, probe)
    evidence = (f"{probe.n} cached decode steps vs one prefill of the same {probe.ids.shape[1] - 1} tokens: max KL "
                f"{kl.max():.2e} nats (step {int(np.argmax(kl))}), top-1 agreement {agree:.0%}, max |logit diff| {diff:.2e}")
    fix = ("the cache the decoder returns is not what it reads back (present/past names or order, a buffer reused "
           "in place, positions of cached tokens): fix the KV wiring; re-export")
    tol, noisy = KV_KL_TOL, False
    if probe.logits is not None:  # the quantization noise at the same positions: this model vs fp32
        noise = float(kl_divergence(probe.logits, recomputed).max())
        tol = max(KV_KL_TOL, KV_NOISE_SHARE * noise)
        noisy = tol > KV_KL_TOL
        evidence += (f"; quantization noise at the same positions (this model vs fp32, recomputed): max KL "
                     f"{noise:.2e}, tolerance max({KV_KL_TOL:g}, {KV_NOISE_SHARE:g} x noise) = {tol:.2e}")
    if kl.max() <= tol and (agree == 1.0 or noisy):
        if kl.max() > KV_KL_TOL:
            evidence += "; within this model's own quantization noise: not a cache fault"
        return CheckItem("kv_cache", title, "pass", evidence)
    if any(n.op_type == "MatMulNBits" and int(attrs(n).get("accuracy_level", 0)) == 4 for n in model.graph().graph.node):
        kl0, agree0, diff0, _ = _cache_gap(model, probe, accuracy_level_decoder(model, 0))
        evidence += (f"; the same graph at accuracy_level 0: max KL {kl0.max():.2e}, top-1 agreement {agree0:.0%}, "
                     f"max |logit diff| {diff0:.2e}")
        if kl0.max() <= KV_KL_TOL and agree0 == 1.0:
            return CheckItem("kv_cache", title, "pass", evidence + ": the cache is wired right; the gap is level 4's "
                             "int8-activation kernels (decode and prefill round differently), see the accuracy_level line")
    return CheckItem("kv_cache", title, "fail", evidence, fix)


def _decoder_at(model: Model, graph: onnx.ModelProto, so: ort.SessionOptions, level: str) -> OnnxDecoder:
    """The decoder graph in a session of its own at one optimization level."""
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.decoder_file.parent))
    session = ort.InferenceSession(graph.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    return OnnxDecoder(session, model.config.text, model.embed, accept_missing=True)


def check_graph_optimizations(model: Model, probe: AnswerProbe | None = None):
    """The probe's answer positions at ORT_ENABLE_ALL (what every runtime uses by default) vs ORT_DISABLE_ALL
    (each node as written): a fusion or rewrite that miscomputes changes the answer only at the first."""
    title = "graph optimizations keep the answer"
    probe = probe if probe is not None else answer_probe(model, keep_logits=False)
    graph = model.graph()
    # ORT_ENABLE_ALL as the user runs it. The doctor opens fp32 graphs without weight prepacking (inspection_options),
    # and a MatMulNBits that a fusion makes of DequantizeLinear + MatMul computes with int8 activations only when
    # prepacked: such a graph gets a session of its own with the user's options; any other runs on the model's decoder
    qdq = any(n.op_type == "DequantizeLinear" for n in graph.graph.node)
    own = model.options.graph_optimization == "all" and not qdq
    on = answer_logits(model, probe, None if own else _decoder_at(model, graph, model.options.session_options(), "all"))
    # ORT_DISABLE_ALL runs each node as written
    so = inspection_options(replace(model.options, graph_optimization="disable"), graph)
    off = answer_logits(model, probe, _decoder_at(model, graph, so, "disable"))  # (n, V)
    kl = kl_divergence(off, on)
    agree = float(np.mean(on.argmax(-1) == off.argmax(-1)))
    evidence = (f"{probe.n} answer positions, ORT_ENABLE_ALL vs ORT_DISABLE_ALL: max KL {kl.max():.2e} nats, "
                f"top-1 agreement {agree:.0%}, max |logit diff| {np.abs(on - off).max():.2e}")
    bad = agree < 1.0 or kl.max() > GRAPH_OPT_KL_TOL
    fixes = ("a graph rewrite changes the answer: run with graph_optimization='extended' or 'disable' and compare; "
             "a DequantizeLinear+MatMul graph is fused into MatMulNBits with int8 activations at ORT_ENABLE_ALL "
             "(session.qdq_matmulnbits_accuracy_level, onnxsim/onnxsim#749); report the fusion upstream "
             "(microsoft/onnxruntime#25855)")
    return CheckItem("graph_opt", title, "fail" if bad else "pass", evidence, fixes)


# -- MRoPE layout ---------------------------------------------------------------------------------
def blocked_inv_freq_by_axis(text: TextConfig) -> np.ndarray:
    """(3, hd/2) Qwen2.5-VL's blocked layout of the same sections: the first mrope_section[0] channels T, the next
    mrope_section[1] H, the rest W (what a Qwen2.5-VL port computes when it meets Qwen3-VL's config)."""
    inv = mrope_inv_freq_by_axis(text).sum(axis=0)  # (hd/2,) each channel's frequency
    axis = np.full(inv.shape, 2)
    t, h = text.mrope_section[0], text.mrope_section[1]
    axis[:t], axis[t:t + h] = 0, 1
    out = np.zeros((3, inv.size))
    out[axis, np.arange(inv.size)] = inv
    return out


def _fastest(table: np.ndarray, axis: int) -> float:
    return float(table[axis].max())


MROPE_SHIFT_BLOCK = (1 / 3, 2 / 3)  # the middle third of a text probe plays the image block


def check_mrope_layout(model: Model, image: ImageProbe | None = None) -> CheckItem:
    """How the decoder's answer reacts when the image tokens move one step along W, against one step along T.

    Each axis rotates its channels at their frequencies: interleaved (Qwen3-VL) gives W a fast channel (j = 2),
    blocked (Qwen2.5-VL) only the slowest ones, so the W/T response ratio is ~1e-2 against ~1e-5 at real dims.
    Measured on the image probe's prompt (its image tokens shifted), else on a text probe whose middle third
    plays the image block; decided by which layout's predicted ratio (from the config) the measured one is nearer."""
    title = "MRoPE layout (interleaved, on an image probe)"
    io = model.teaching_decoder.io
    if io.positions != "3d":
        return CheckItem("mrope", title, "skip", "the decoder takes no 3-D position_ids (the positions line names it)")
    if image is not None:
        p = image.prompt
        block = np.flatnonzero(p.input_ids[0] == model.config.image_token_id)
        where = f"the image probe's {block.size} image tokens"
    else:
        p = prepare_prompt(model, "Describe the picture in one sentence, please.", raw=True)
        S = p.input_ids.shape[1]
        block = np.arange(int(S * MROPE_SHIFT_BLOCK[0]), int(S * MROPE_SHIFT_BLOCK[1]))
        where = f"{block.size} tokens of a text probe standing in for an image block"
    base = _prefill_all(model, p)
    response = {}
    for axis, name in ((0, "T"), (2, "W")):
        moved = replace(p, positions=Positions(p.positions.position_ids.copy(), p.positions.rope_deltas))
        moved.positions.position_ids[axis, :, block] += 1
        response[name] = float(np.abs(_prefill_all(model, moved) - base).max())
    if response["T"] == 0.0 or response["W"] == 0.0:
        return CheckItem("mrope", title, "skip", f"moving {where} along {'T' if response['T'] == 0 else 'W'} changes "
                         "nothing: the decoder does not read that row (the positions line names it)")
    text = model.config.text
    measured = response["W"] / response["T"]
    tables = {"interleaved": mrope_inv_freq_by_axis(text), "blocked": blocked_inv_freq_by_axis(text)}
    if any(_fastest(t, axis) == 0.0 for t in tables.values() for axis in (0, 2)):
        return CheckItem("mrope", title, "skip", f"the model's config (mrope_section {text.mrope_section}, head_dim "
                         f"{text.head_dim}) gives T or W no rotary channel, so neither layout predicts a W/T ratio to "
                         f"compare with the measured {measured:.2g}")
    predicted = {layout: _fastest(t, 2) / _fastest(t, 0) for layout, t in tables.items()}
    nearest = min(predicted, key=lambda k: abs(np.log(measured / predicted[k])))
    evidence = (f"{where} moved one step: max |logit change| along T {response['T']:.3g}, along W {response['W']:.3g}; "
                f"W/T {measured:.2g} (fastest W / T channel frequency: interleaved {predicted['interleaved']:.2g}, "
                f"blocked {predicted['blocked']:.2g}): {nearest}")
    return CheckItem("mrope", title, "pass" if nearest == "interleaved" else "fail", evidence,
                     "Qwen3-VL interleaves the T/H/W channels (j % 3) where Qwen2.5-VL uses blocked sections; compute "
                     "cos/sin with the interleaved layout (alibaba/MNN PR #4133); re-export")


def probe_image(size: int = 64) -> np.ndarray:
    """A fixed synthetic picture: a colour gradient with a bright square, (size, size, 3) uint8."""
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    img[size // 4: size // 2, size // 2: 3 * size // 4] = (255, 255, 255)
    return img


@dataclass
class ImageProbe:
    """The reference's side of the image probe, kept after the reference is released (a few MB)."""

    prompt: Prompt  # the image prompt as the reference prepared it: embeddings, 3-D positions, DeepStack
    full: np.ndarray  # (1, V) the reference's logits for the answer's first token
    ablations: dict[str, float]  # KL of the reference without a piece ("1-D positions", "no DeepStack") vs full


def probe_prompt(reference: Model, image=None, image_size: int | None = None) -> Prompt:
    """The image probe's prompt, prepared by the reference (its embedding and vision graph).

    image: the user's picture (the doctor's --image), else a fixed synthetic one at 64 x 64 — which a model may
    barely react to, so pass a real image of the model's task when there is one."""
    picture, size = (probe_image(), 64) if image is None else (image, image_size)
    return prepare_multimodal_prompt(reference, PROBE_QUESTION, images=[picture], image_size=size)


def probe_reference(reference: Model, image=None, image_size: int | None = None, *,
                    prompt: Prompt | None = None) -> ImageProbe:
    """One image prompt (`probe_prompt`, or `prompt` prepared by it earlier) through the reference, whole and
    without each piece (1-D positions, no DeepStack)."""
    p = prompt if prompt is not None else probe_prompt(reference, image, image_size)
    full = _prefill_all(reference, p)[-1:]  # (1, V) the next token after the prompt
    ablations = {"1-D positions": _prefill_all(reference, p, one_d=True)[-1:],
                 "no DeepStack": _prefill_all(reference, p, deepstack=False)[-1:]}
    return ImageProbe(p, full, {k: float(kl_divergence(full, v)[0]) for k, v in ablations.items()})


def check_image_probe(model: Model, reference: Model | ImageProbe | None, image=None, image_size: int | None = None):
    """The image probe (`probe_reference`, run here when given the reference Model) through the tested decoder:
    the same embeddings, positions and DeepStack, with what the decoder lacks left out."""
    title = "image prompt: 3-D positions and DeepStack"
    if reference is None or (isinstance(reference, Model) and not reference.has_vision):
        return CheckItem("image_probe", title, "skip", "needs a reference with a vision graph (our export of the "
                         "checkpoint: doctor --hf_dir CKPT, or a folder whose pytorch/ holds the checkpoint)")
    probe = reference if isinstance(reference, ImageProbe) else probe_reference(reference, image, image_size)
    missing = model.teaching_decoder.io.missing
    one_d = model.teaching_decoder.io.positions != "3d"
    test = _prefill_all(model, probe.prompt, one_d=one_d)[-1:]  # the same embeddings, positions and DeepStack
    kl_test = float(kl_divergence(probe.full, test)[0])
    same_top = int(probe.full.argmax()) == int(test.argmax())
    matters = [k for k, v in probe.ablations.items() if v > PROBE_KL_MATTERS]
    evidence = (f"KL vs the reference at the answer's first token: this decoder {kl_test:.3g} nats "
                f"(top-1 {'same' if same_top else 'differs'}); the reference with 1-D positions "
                f"{probe.ablations['1-D positions']:.3g}, without DeepStack {probe.ablations['no DeepStack']:.3g}"
                + (f"; this decoder lacks {', '.join(missing)}" if missing else ""))
    bad = any(m.startswith(("3-D positions", "DeepStack")) for m in missing) and (kl_test > PROBE_KL_MATTERS or matters)
    return CheckItem("image_probe", title, "fail" if bad else "pass", evidence,
                     "image prompts need (3, B, S) MRoPE positions and DeepStack in the decoder: export the checkpoint "
                     "with `qwen3vl-lab export` (text prompts are unaffected: 1-D RoPE equals MRoPE when t = h = w)")


def check_algorithm(model: Model, graph: onnx.ModelProto):
    """The quantization recipe, as recorded by the export (ours) or as far as the graph tells (others')."""
    title = "quantization recipe"
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return CheckItem("algorithm", title, "skip", "no MatMulNBits: not quantized")
    seen = sorted({(int(attrs(n).get("bits", 4)), int(attrs(n).get("block_size", 0)),
                    int(attrs(n).get("accuracy_level", 0)), len(n.input) > 3 and bool(n.input[3])) for n in nodes})
    shown = "; ".join(f"{b}-bit block {bs} accuracy_level {acc} {'asymmetric' if zp else 'symmetric'}"
                      for b, bs, acc, zp in seen)
    recipe = (model.genai.get("qwen3vl_lab") or {}).get("recipe")
    algo = recipe.get("algorithm", "default") if recipe else None
    evidence = f"{len(nodes)} MatMulNBits: {shown}; algorithm " + (
        f"{algo} (recorded by qwen3vl-lab)" if algo else "not recorded (onnxruntime-genai's builder defaults to RTN)")
    rtn_only = algo in (None, "rtn", "default") and all(b <= 4 for b, *_ in seen)
    return CheckItem("algorithm", title, "pass", evidence + (
        "; RTN rounds each block to its nearest grid point: if the doctor shows drift, compare recipes with "
        "`qwen3vl-lab sweep`" if rtn_only else ""))


__all__ = ["AnswerProbe", "ImageProbe", "answer_logits", "answer_probe", "blocked_inv_freq_by_axis", "check_algorithm",
           "check_graph_optimizations", "check_image_probe", "check_kv_cache", "check_mrope_layout", "probe_image",
           "probe_prompt", "probe_reference", "text_prompt"]
