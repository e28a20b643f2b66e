"""Checks of what an export has, measured by running it: for any decoder, ours or another tool's.

    kv_cache     decoding with the cache gives the logits of recomputing the whole sequence on the same
                 decoder (the third cause of gibberish: a corrupt cache; measured, not read from the graph)
    image_probe  one image prompt through the reference and through the tested decoder, and through the
                 reference without each piece (1-D positions, no DeepStack): which pieces the answer needs
    algorithm    the quantization recipe the export records (bits, block, symmetric, accuracy_level, algorithm)

Each returns a `CheckItem` (checklist.py) with its evidence. The image probe needs a reference with a vision
graph (our export of the same checkpoint); the tested decoder is run with `accept_missing`, and what it
lacked is named in the evidence. The reference's side (`probe_reference`) can run first and alone: the
doctor records it, releases the reference, then checks the tested decoder against the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..generate import Prompt, generate_step, prepare_multimodal_prompt, prepare_prompt
from ..model import Model
from ..positions import Positions
from ..sampling import greedy
from .checkitem import CheckItem, attrs
from .compare import kl_divergence

# nats: cached and recomputed next-token distributions agree to kernel rounding. fp32 agrees to ~1e-12; an INT4
# decoder's prefill and decode kernels differ more (measured 5.5e-4 at 2B dims, top-1 still identical), while a
# corrupted cache moves the distribution by far more than 1e-2 and changes the argmax.
KV_KL_TOL = 1e-2
KV_STEPS = 6
PROBE_QUESTION = "Describe the image."
PROBE_KL_MATTERS = 1e-3  # nats: a piece "matters" when leaving it out moves the next-token distribution more


def _prefill_all(model: Model, p: Prompt, *, deepstack=True, one_d: bool = False) -> np.ndarray:
    """(S, V) logits of every position of one prefill (the teaching decoder, missing pieces accepted)."""
    dec = model.teaching_decoder
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


def check_kv_cache(model: Model, prompt: str = "Write a haiku about the sea.", steps: int = KV_STEPS):
    """Decode `steps` greedy tokens with the cache, then recompute the whole sequence in one prefill."""
    title = "KV cache consistent"
    p = prepare_prompt(model, prompt)
    records = list(generate_step(model, p, greedy, steps, eos_token_ids=[]))
    cached = np.stack([r.logits[0].copy() for r in records])  # (steps, V)
    tokens = np.array([int(r.tokens[0]) for r in records[:-1]], np.int64)  # the tokens fed back
    ids = np.concatenate([p.input_ids, tokens[None]], axis=1)  # (1, S + steps - 1)
    whole = Prompt(ids, model.embed(ids) if model.embedding is not None else None,
                   Positions(np.broadcast_to(np.arange(ids.shape[1]), (3, 1, ids.shape[1])).copy(),
                             p.positions.rope_deltas))
    recomputed = _prefill_all(model, whole)[-steps:]  # (steps, V)
    kl = kl_divergence(recomputed, cached)  # (steps,)
    agree = float(np.mean(recomputed.argmax(-1) == cached.argmax(-1)))
    worst = int(np.argmax(kl))
    evidence = (f"{steps} cached decode steps vs one prefill of the same {ids.shape[1]} tokens: max KL "
                f"{kl.max():.2e} nats (step {worst}), top-1 agreement {agree:.0%}, max |logit diff| "
                f"{np.abs(recomputed - cached).max():.2e}")
    bad = kl.max() > KV_KL_TOL or agree < 1.0
    return CheckItem("kv_cache", title, "fail" if bad else "pass", evidence,
                     "the cache the decoder returns is not what it reads back (present/past names or order, "
                     "a buffer reused in place, positions of cached tokens): fix the KV wiring; re-export")


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


__all__ = ["ImageProbe", "check_algorithm", "check_image_probe", "check_kv_cache", "probe_image", "probe_prompt", "probe_reference"]
