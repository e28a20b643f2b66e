"""The INT4-gibberish checklist, run against one model folder.

    cl = run_checklist("OUT", "int4")              # or run_checklist(model, reference=fp32_model)
    print(cl.table()); cl.failed                    # [CheckItem(key, title, status, evidence, fix), ...]

Each line is pass / warn / fail (or skip when it does not apply) with the evidence it was decided on. FAIL
means broken (answers change beyond the line's stated budget, or a piece is missing); WARN a known risk
measured and found within budget, saying what was measured:

    accuracy_level   MatMulNBits accuracy_level 4 quantizes activations to int8 per block: the oracle (the
                     same graph rewritten to level 0) decides on the fp32 reference's answer tokens; FAIL
                     when level 4 changes more than ACC4_ANSWER_BUDGET of them beyond what level 0 changes
    lm_head          an INT4 lm_head (repetition, onnxruntime#24384): a WARN (a risk, not a measured fault:
                     the doctor's recipe ranking and `repair` measure what an 8-bit head changes)
    tied_embeddings  the embedding table vs the lm_head: equal (within quantization error) iff tied;
                     fails on a head-derived embedding for an untied model (onnxruntime-genai#2306)
                     or on embeddings dequantized from a quantized head
    qk_norm          every layer's q_norm and k_norm weights reach the logits (alibaba/MNN#4683)
    genai_config     type qwen3_vl; decoder I/O names in genai_config.json exist in the graph
    positions        3-D positions and rope_deltas equal transformers' get_rope_index values; the decoder reads all three position rows
    deepstack        decoder input, vision output and qwen3vl_lab.json entry present, and every
                     DeepStack slice changes the decoder's output
    eos              <|im_end|> and <|endoftext|> are end-of-sequence ids
    generation_eos   every eos id of the checkpoint's generation_config.json is one the runtime and
                     genai_config.json stop on (runtimes that read one id run on: QwenLM/Qwen3#927)
    fp16_overflow    the largest activation per layer (fp32 taps: MatMul inputs and residual stream) vs
                     65504, what a q4f16 / fp16 export of the same model would hit (transformers#33294,
                     onnxruntime#31626): FAIL when this decoder computes in fp16, else WARN
    graph_opt, mrope, kv_cache, image_probe, algorithm: export_checks.py
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..config import IMAGE_TOKEN_ID, VISION_END_TOKEN_ID, VISION_START_TOKEN_ID
from ..export.quantize import read_array
from ..generate import Prompt, prepare_prompt
from ..layout import DECODER_FILE, DEEPSTACK_EMBEDS, DEEPSTACK_FEATURES, EMBEDDING_FILE, VISION_FILE
from ..model import Model
from ..positions import Positions, build_positions, next_positions
from ..steps import embed, prefill
from .checkitem import CheckItem, Checklist, attrs
from .compare import kl_divergence
from .export_checks import (
    AnswerProbe,
    ImageProbe,
    answer_logits,
    answer_probe,
    check_algorithm,
    check_graph_optimizations,
    check_image_probe,
    check_kv_cache,
    check_mrope_layout,
)
from .inputs import as_model
from .layers import accuracy_level_decoder, activation_stats, capture, matmul_inputs, tap_names
from .weights import QuantizedMatrix, iter_quantized, short_name

OUTLIER_RATIO = 20.0  # an input channel 20x the median channel: Qwen3-style massive activations
ACC4_KL_FACTOR = 1.25  # accuracy_level 4 adds >= 25% KL (vs fp32) over the same weights at level 0: a WARN
# accuracy_level 4 is a FAIL when it changes more than this share of the reference's answer tokens (top-1 at the
# probe's answer positions) beyond what the same weights at level 0 change: 2 of 16 tokens. A level that only
# moves the distribution (the toolkit's default export of the shapes model: KL 0.021 vs 0.016, 97% of held-out
# answers equal to fp32's) is a WARN saying so.
ACC4_ANSWER_BUDGET = 0.1
FP16_MAX = 65504.0  # the largest finite float16
TIED_REL_DIFF = 0.7  # embedding rows vs head columns: INT4 error ~0.1, 2-bit ~0.4, unrelated matrices ~1.4
CHANGE_TOL = 1e-4  # logits "change" when some logit moves by more than this
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


# -- helpers -------------------------------------------------------------------------------------
def live_nodes(graph: onnx.GraphProto, outputs=("logits",)) -> set[int]:
    """Indices of the nodes that the given graph outputs depend on."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    live, stack = set(), [producer[o] for o in outputs if o in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        stack.extend(producer[x] for x in graph.node[i].input if x in producer)
    return live


def _probe(model: Model, text: str = PROBE_TEXT):
    """A short raw-text prompt: ids (1, S), embeddings (1, S, H), positions."""
    return prepare_prompt(model, text, raw=True)


def _logits(model: Model, p: Prompt, position_ids=None, deepstack=None) -> np.ndarray:
    """All positions' logits (S, V) of one prefill of `p` (other positions / DeepStack when given). The
    prompt's embeddings are used as they are; a prompt without them (its model's decoder embeds token ids)
    is embedded by `model` when its decoder takes embeddings."""
    embeds = p.inputs_embeds if p.inputs_embeds is not None or model.embedding is None else model.embed(p.input_ids)
    pos = Positions(np.asarray(p.positions.position_ids if position_ids is None else position_ids, np.int64),
                    np.zeros((p.input_ids.shape[0], 1), np.int64))
    return prefill(model, embeds, pos, deepstack=deepstack, logits_to_keep=0, input_ids=p.input_ids).logits[0]


def needs_fp32_logits(graph: onnx.ModelProto) -> bool:
    """Does the accuracy_level check run its level-0 oracle? Only on level-4 MatMulNBits."""
    return any(n.op_type == "MatMulNBits" and int(attrs(n).get("accuracy_level", 0)) == 4 for n in graph.graph.node)


def fp32_logits(reference: Model, probe: Prompt) -> np.ndarray:
    """(S, V) the reference's logits on a prompt (`prepare_prompt(test, prompt)`), every position."""
    return _logits(reference, probe)


def check_accuracy_level(model: Model, graph: onnx.ModelProto, probe: AnswerProbe | None = None) -> CheckItem:
    """probe: the fp32 reference's answer (`answer_probe(reference)`), or None (the tested model's own answer: level 4
    judged against level 0 alone). Level 4 and the level-0 oracle (same weights) are run teacher forced on it."""
    title = "accuracy_level 4 on activation outliers"
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        return CheckItem("accuracy_level", title, "pass", "no MatMulNBits: activations are never quantized")
    levels = [int(attrs(n).get("accuracy_level", 0)) for n in nodes]
    n4 = sum(lv == 4 for lv in levels)
    if n4 == 0:
        return CheckItem("accuracy_level", title, "pass",
                         f"accuracy_level {sorted(set(levels))} on {len(nodes)} MatMulNBits: activations stay float")
    probe = probe if probe is not None else answer_probe(model, keep_logits=False)
    stats = [s for s in activation_stats(model, probe.text) if s.accuracy_level == 4]
    worst = max(stats, key=lambda s: s.channel_ratio)
    zeroed = max(s.int8_zeroed for s in stats)
    evidence = (f"{n4}/{len(nodes)} MatMulNBits at level 4; largest activation channel {worst.channel_ratio:.1f}x "
                f"the median (input of {worst.node}); int8 blocks round up to {zeroed:.0%} of an input to zero")
    logits4 = answer_logits(model, probe)  # (n, V) teacher forced on the probe's answer
    logits0 = answer_logits(model, probe, accuracy_level_decoder(model, 0))  # the same weights at level 0
    top4, top0 = logits4.argmax(-1), logits0.argmax(-1)
    budget = f"budget {ACC4_ANSWER_BUDGET:.0%} of {probe.n} answer tokens"
    if probe.logits is not None:  # measured against fp32's answer: does level 4 change answers level 0 keeps?
        ref = probe.tokens
        agree4, agree0 = float(np.mean(top4 == ref)), float(np.mean(top0 == ref))
        kl4, kl0 = float(kl_divergence(probe.logits, logits4).mean()), float(kl_divergence(probe.logits, logits0).mean())
        evidence += (f"; on fp32's {probe.n}-token answer: top-1 agreement level 4 {agree4:.0%}, level 0 {agree0:.0%}; "
                     f"mean KL vs fp32 level 4 {kl4:.4g}, level 0 {kl0:.4g}")
        changed, worse = agree0 - agree4, kl4 > ACC4_KL_FACTOR * kl0 + 1e-6
    else:  # no fp32 at hand: level 4 against the same weights at level 0
        changed = float(np.mean(top4 != top0))
        worse = worst.channel_ratio >= OUTLIER_RATIO
        evidence += (f"; level 4 vs level 0 on the model's own {probe.n}-token answer: {changed:.0%} of top-1 tokens "
                     f"differ, mean KL {float(kl_divergence(logits0, logits4).mean()):.4g} (no fp32 reference)")
    fix = ("re-export with --accuracy_level 0 (or 1/2) and compare; keep level 4 only where the doctor shows no loss "
           "(microsoft/onnxruntime#29849); on outlier channels `qwen3vl-lab repair` equalises them first")
    measured = {"channel_ratio": worst.channel_ratio, "node": worst.node, "changed": changed}
    if changed > ACC4_ANSWER_BUDGET:
        return CheckItem("accuracy_level", title, "fail", evidence + f"; level 4 changes {changed:.0%} of the answer "
                         f"tokens ({budget})", fix, measured)
    if worse:
        return CheckItem("accuracy_level", title, "warn", evidence + f"; it moves the distribution but changes "
                         f"{max(changed, 0.0):.0%} of the answer tokens ({budget}): a measured cost, not a failure",
                         measured=measured)
    return CheckItem("accuracy_level", title, "pass", evidence, measured=measured)


def lm_head_node(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    return next((n for n in graph.node if "logits" in n.output), None)


def check_lm_head(graph: onnx.ModelProto) -> CheckItem:
    title = "int4 lm_head"
    node = lm_head_node(graph.graph)
    if node is None:
        return CheckItem("lm_head", title, "skip", "no node writes `logits`")
    if node.op_type == "MatMulNBits":
        a = attrs(node)
        bits = int(a.get("bits", 4))
        ev = f"lm_head is MatMulNBits bits {bits}, block {a.get('block_size')}, accuracy_level {a.get('accuracy_level', 0)}"
        if bits > 4:
            return CheckItem("lm_head", title, "pass", ev)
        return CheckItem("lm_head", title, "warn", ev + "; an INT4 head made Phi-4-mini repeat itself "
                         "(microsoft/onnxruntime#24384): a risk, not a measured fault here: the comparison below and "
                         "the doctor's recipe ranking (an 8-bit head among them) measure what it changes")
    return CheckItem("lm_head", title, "pass", f"lm_head is a {node.op_type} on fp32 weights")


def _head_columns(model: Model, graph: onnx.ModelProto, ids: np.ndarray) -> tuple[np.ndarray, str]:
    """The lm_head's weight columns for token ids (n, H), as the decoder multiplies by them."""
    node = lm_head_node(graph.graph)
    if node.op_type == "MatMulNBits":
        qm: QuantizedMatrix = next(q for q in iter_quantized(model, {short_name(node.input[1])}) if q.node == node.name)
        return qm.columns(ids).dequantize().T, f"MatMulNBits bits {qm.bits}"
    inits = {t.name: t for t in graph.graph.initializer}
    w = read_array(inits[node.input[1]], model.decoder_file.parent)  # (H, V)
    return np.ascontiguousarray(w[:, ids].T), "fp32"


def check_tied_embeddings(model: Model, graph: onnx.ModelProto) -> CheckItem:
    title = "tied embeddings / quantized head"
    emb_file = model.layout.embedding if model.layout else model.folder / EMBEDDING_FILE
    emb = onnx.load(str(emb_file), load_external_data=False) if emb_file is not None else graph  # else: inside the decoder
    quantized_table = [n.op_type for n in emb.graph.node if n.op_type in ("GatherBlockQuantized", "DequantizeLinear")]
    if emb_file is None and not quantized_table:
        return CheckItem("tied_embeddings", title, "skip", "the decoder embeds token ids itself with an fp32 table")
    if lm_head_node(graph.graph) is None:
        return CheckItem("tied_embeddings", title, "skip", "no lm_head found")
    tok = model.tokenizer
    special = [tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    rng = np.random.default_rng(0)
    ids = np.unique(np.concatenate([special, rng.integers(0, model.config.text.vocab_size, 256)])).astype(np.int64)
    if emb_file is None:
        return CheckItem("tied_embeddings", title, "fail", f"the decoder reads its input embeddings through "
                         f"{', '.join(sorted(set(quantized_table)))} from the quantized lm_head",
                         "keep the embedding table fp32: a table dequantized from a quantized head adds the head's "
                         "error to every input token (microsoft/onnxruntime-genai#2306)")
    rows = embed(model, ids[None, :])[0]  # (n, H) what the embedding graph returns
    cols, kind = _head_columns(model, graph, ids)  # (n, H)
    rel = float(np.linalg.norm(rows - cols) / max(np.linalg.norm(rows), 1e-30))
    tied = model.config.tie_word_embeddings
    same = rel < TIED_REL_DIFF
    evidence = (f"config tie_word_embeddings={tied}; embedding table is "
                f"{'quantized (' + ', '.join(quantized_table) + ')' if quantized_table else 'an fp32 Gather'}; "
                f"{len(ids)} embedding rows vs lm_head ({kind}) columns: relative difference {rel:.3f}")
    if quantized_table:
        return CheckItem("tied_embeddings", title, "fail", evidence,
                         "keep the embedding table fp32: a table dequantized from a quantized head adds the head's "
                         "error to every input token (microsoft/onnxruntime-genai#2306)")
    if tied and not same:
        return CheckItem("tied_embeddings", title, "fail", evidence,
                         "the checkpoint ties the head to the embedding, but the export does not: re-export")
    if not tied and same:
        return CheckItem("tied_embeddings", title, "fail", evidence,
                         "the checkpoint has its own lm_head.weight but the embedding reads it "
                         "(shared_embeddings on an untied model, microsoft/onnxruntime-genai#2306): re-export")
    return CheckItem("tied_embeddings", title, "pass", evidence)


def check_qk_norm(model: Model, graph: onnx.ModelProto) -> CheckItem:
    title = "q_norm / k_norm present"
    g = graph.graph
    live = live_nodes(g)
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    inits = [t.name for t in g.initializer]
    missing = []
    layers = model.config.text.num_hidden_layers
    for i in range(layers):
        for which in ("q_norm", "k_norm"):
            names = [t for t in inits if f"layers.{i}." in t and which in t]
            if not any(c in live for t in names for c in consumers.get(t, [])):
                missing.append(f"layers.{i}.{which}")
    ok = not missing
    evidence = (f"{layers}/{layers} layers apply q_norm and k_norm on the path to the logits" if ok else
                f"missing or unused: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    return CheckItem("qk_norm", title, "pass" if ok else "fail", evidence,
                     "export the per-head RMSNorm on q and k before RoPE (alibaba/MNN#4683); re-export")


def check_genai_config(model: Model) -> CheckItem:
    title = "genai_config type and I/O names"
    if not model.genai:
        return CheckItem("genai_config", title, "skip", "this export has no genai_config.json")
    m = model.genai.get("model", {})
    dec = m.get("decoder", {})
    problems = []
    if m.get("type") != "qwen3_vl":
        problems.append(f"type is {m.get('type')!r}, not 'qwen3_vl'")
    n = model.config.text.num_hidden_layers
    ins = {i.name for i in model.decoder.get_inputs()}
    outs = {o.name for o in model.decoder.get_outputs()}
    checked = 0
    for section, names in (("inputs", ins), ("outputs", outs)):
        for key, value in dec.get(section, {}).items():
            expected = [value % i for i in range(n)] if "%d" in value else [value]
            for v in expected:
                checked += 1
                if v not in names:
                    problems.append(f"decoder.{section}.{key} {v!r} is not in the graph")
    for part, _default in (("decoder", DECODER_FILE), ("embedding", EMBEDDING_FILE), ("vision", VISION_FILE)):
        fn = m.get(part, {}).get("filename")
        if fn and not (model.folder / fn).is_file():
            problems.append(f"{part}.filename {fn} does not exist")
    if dec.get("num_hidden_layers") != n or dec.get("head_size") != model.config.text.head_dim:
        problems.append("decoder num_hidden_layers/head_size disagree with the model config")
    evidence = f"type {m.get('type')!r}; {checked} decoder I/O names checked against the graph"
    if problems:
        evidence += "; " + "; ".join(problems[:4])
    return CheckItem("genai_config", title, "fail" if problems else "pass", evidence,
                     "set model.type to qwen3_vl and make decoder.inputs/outputs match the graph's names (re-export)")


def reference_positions_case() -> tuple[np.ndarray, np.ndarray]:
    """get_rope_index's values, measured with transformers 5.24: 6-token prefix (incl. <|vision_start|>), one [1, 18, 24] image, 146 tokens."""
    ids = [11] * 5 + [VISION_START_TOKEN_ID] + [IMAGE_TOKEN_ID] * 108 + [VISION_END_TOKEN_ID] + [11] * 31
    return np.array([ids], np.int64), np.array([[1, 18, 24]], np.int64)


def _positions_known_answer() -> list[str]:
    """Differences between build_positions and the values transformers' get_rope_index gave."""
    ids, grid = reference_positions_case()
    pos = build_positions(ids, grid)
    p = pos.position_ids[:, 0]  # (3, 146)
    k = np.arange(108)
    problems = []
    if not (p[0, 6:114] == 6).all():
        problems.append("image T positions are not all 6")
    if not ((p[1, 6:114] == 6 + k // 12).all() and (p[2, 6:114] == 6 + k % 12).all()):
        problems.append("image H/W positions are not (6 + r, 6 + c) over the 9x12 grid")
    if not (p[:, 114] == 18).all():
        problems.append(f"<|vision_end|> is at {p[:, 114].tolist()}, not 18")
    if not (p[:, 145] == 49).all() or not (p[:, :6] == np.arange(6)).all():
        problems.append("text positions are not 0..5 before and ..49 after the image")
    if int(pos.rope_deltas[0, 0]) != -96:
        problems.append(f"rope_delta is {int(pos.rope_deltas[0, 0])}, not -96")
    mask = np.ones((1, 149), np.int64)
    nxt = next_positions(mask, pos.rope_deltas, 3)[:, 0]  # decode steps 0..2
    if not (nxt == np.array([50, 51, 52])).all():
        problems.append(f"decode positions are {nxt[0].tolist()}, not [50, 51, 52]")
    return problems


def check_positions(model: Model) -> CheckItem:
    title = "3-D position ids and rope_deltas"
    problems = _positions_known_answer()
    io = model.teaching_decoder.io
    if io.positions != "3d":
        problems.append("the decoder takes " + ("1-D position_ids (batch, seq)" if io.positions == "1d" else
                                                 "no position_ids (rotary positions from the mask: 1-D)")
                        + ", not (3, batch, seq)")
        ignored = []
    else:
        p = _probe(model)
        pos = p.positions.position_ids  # (3, 1, S) text: three equal rows
        base = _logits(model, p, pos)
        ignored = []
        for row, axis in ((0, "T"), (1, "H"), (2, "W")):
            changed = pos.copy()
            changed[row] = 0  # like an image block: one axis constant, so relative distances change
            if np.abs(_logits(model, p, changed) - base).max() <= CHANGE_TOL:
                ignored.append(axis)
        if ignored:
            problems.append(f"the decoder ignores the {'/'.join(ignored)} row(s) of position_ids (1-D positions)")
    evidence = ("build_positions matches get_rope_index on the image case (delta -96, decode 50, 51, 52); "
                "the decoder reads the T, H and W rows") if not problems else "; ".join(problems)
    return CheckItem("positions", title, "fail" if problems else "pass", evidence,
                     "build (3, B, S) MRoPE positions like get_rope_index and feed all three rows to the rotary "
                     "embedding; decode uses cache_len + rope_delta")


def check_deepstack(model: Model) -> CheckItem:
    title = "DeepStack wired"
    d = model.config.num_deepstack
    if d == 0:
        return CheckItem("deepstack", title, "skip", "the checkpoint has no DeepStack layers")
    problems = []
    # qwen3vl_lab.json names it (onnxruntime-genai's schema has no such input); older exports: genai_config.json
    own = model.genai.get("qwen3vl_lab", {}).get("decoder", {}).get("inputs", {})
    if own.get(DEEPSTACK_EMBEDS) is None and model.genai.get("model", {}).get("decoder", {}).get("inputs", {}).get(DEEPSTACK_EMBEDS) is None:
        problems.append("neither qwen3vl_lab.json nor genai_config.json names the decoder input deepstack_embeds")
    dec = model.teaching_decoder
    if dec.io.deepstack is None:
        problems.append("the decoder has no deepstack_embeds input")
    elif dec.num_deepstack != d:
        problems.append(f"deepstack_embeds has {dec.num_deepstack} slices, the config {d}")
    vision = "no vision graph"
    if model.has_vision:
        outs = [o.name for o in model.vision.get_outputs()]
        vision = "the vision graph returns deepstack_features" if DEEPSTACK_FEATURES in outs else ""
        if not vision:
            problems.append("the vision graph has no deepstack_features output")
    dead = []
    if dec.io.deepstack is not None and dec.num_deepstack == d:
        p = _probe(model)
        (B, S), H = p.input_ids.shape, model.config.text.hidden_size
        zeros = np.zeros((d, B, S, H), np.float32)
        base = _logits(model, p, deepstack=zeros)
        rng = np.random.default_rng(0)
        for j in range(d):
            impulse = zeros.copy()
            impulse[j, :, 2] = rng.standard_normal(H).astype(np.float32)  # one visual position, one layer
            if np.abs(_logits(model, p, deepstack=impulse) - base).max() <= CHANGE_TOL:
                dead.append(j)
        if dead:
            problems.append(f"DeepStack slice(s) {dead} do not change the output (not added to the residual stream)")
    evidence = (f"{d} DeepStack slices reach the decoder (each changes the logits); {vision}" if not problems
                else "; ".join(problems))
    return CheckItem("deepstack", title, "fail" if problems else "pass", evidence,
                     "add deepstack feature j to the hidden state after decoder layer j at the visual positions "
                     "(microsoft/onnxruntime-genai#1989); re-export")


def check_eos(model: Model) -> CheckItem:
    title = "eos ids"
    tok = model.tokenizer
    need = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    ours = set(model.config.eos_token_ids)
    if model.genai.get("model"):
        genai_eos = model.genai["model"].get("eos_token_id")
        genai_eos = set(genai_eos if isinstance(genai_eos, list) else [genai_eos])
        evidence = f"genai_config eos_token_id {sorted(genai_eos)}; runtime stops on {sorted(ours)}"
    else:  # no genai_config.json (onnx-community's layout): the checkpoint's config decides alone
        genai_eos = ours
        evidence = f"no genai_config.json; runtime stops on {sorted(ours)} (the checkpoint's config)"
    missing = [f"{t} ({i})" for t, i in need.items() if i not in genai_eos or i not in ours]
    if missing:
        evidence += f"; missing {', '.join(missing)}"
    return CheckItem("eos", title, "fail" if missing else "pass", evidence,
                     "list both <|im_end|> (151645) and <|endoftext|> (151643) as eos_token_id")


def _generation_config(model: Model) -> Path | None:
    """The export's copy of the checkpoint's generation_config.json: inside the export (pytorch/, the shipped
    checkpoint, the tokenizer folder or the decoder's folder), never a path the folder names."""
    root = model.layout.root if model.layout else model.folder
    for folder in (root / "pytorch", model.layout.hf_dir if model.layout else None,
                   model.layout.tokenizer_dir if model.layout else None, model.folder, root):
        if folder is not None and (folder / "generation_config.json").is_file():
            return folder / "generation_config.json"
    return None


def check_generation_eos(model: Model) -> CheckItem:
    """Every end-of-sequence id the checkpoint's generation_config.json lists is one generation stops on."""
    title = "generation_config.json eos ids honoured"
    path = _generation_config(model)
    if path is None:
        return CheckItem("generation_eos", title, "skip", "no generation_config.json in the export")
    try:
        if path.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MiB")
        listed = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        return CheckItem("generation_eos", title, "fail", f"{path.name} is unreadable ({type(e).__name__}: {e})",
                         "restore the checkpoint's generation_config.json")
    ids = [i for i in (listed if isinstance(listed, list) else [listed]) if isinstance(i, int)][:64]
    if not ids:
        return CheckItem("generation_eos", title, "skip", f"{path.parent.name}/{path.name} lists no eos_token_id")
    stops = {"the runtime": set(model.config.eos_token_ids)}
    if model.genai.get("model"):
        g = model.genai["model"].get("eos_token_id")
        stops["genai_config.json"] = set(g if isinstance(g, list) else [g])
    missing = [f"{who} ignores {sorted(set(ids) - have)}" for who, have in stops.items() if set(ids) - have]
    evidence = (f"{path.parent.name}/{path.name} eos_token_id {ids}; "
                + "; ".join(f"{who} stops on {sorted(have)}" for who, have in stops.items()))
    if missing:
        return CheckItem("generation_eos", title, "fail", evidence + "; " + "; ".join(missing),
                         "stop on every eos_token_id of generation_config.json (onnxruntime-genai reads genai_config's "
                         "eos_token_id: list them all there; onnxruntime/mobius PR #521, QwenLM/Qwen3#927); re-export")
    return CheckItem("generation_eos", title, "pass", evidence)


@dataclass
class ActivationPeaks:
    """The largest |activation| per decoder layer on one prompt (MatMul inputs and the residual stream), from the
    fp32 reference's taps: what a float16 export of the same weights would have to hold (a few numbers)."""

    source: str  # which model it was measured on
    layers: list[tuple[float, str]]  # per layer: (peak, the tensor it is in)

    @property
    def peak(self) -> tuple[int, float, str]:
        i = int(np.argmax([v for v, _ in self.layers]))
        return i, *self.layers[i]


_LAYER = re.compile(r"layers\.(\d+)\.")


def activation_peaks(model: Model, prompt: str = "Write a haiku about the sea.", source: str = "") -> ActivationPeaks:
    """Run one prefill with every weight MatMul's input and every hook point tapped; the max |x| per layer."""
    names = {t: w for _, t, w, _, _ in matmul_inputs(model.graph())}
    got = capture(model, prompt, [*dict.fromkeys([*names, *tap_names(model)[:-1]])])
    layers: dict[int, tuple[float, str]] = {}
    for tensor, x in got.items():
        m = _LAYER.search(names.get(tensor, tensor))
        if m is None:
            continue
        i, peak = int(m.group(1)), float(np.abs(x).max())
        where = short_name(names[tensor]) + " input" if tensor in names else tensor
        if peak > layers.get(i, (-1.0, ""))[0]:
            layers[i] = (peak, where)
    return ActivationPeaks(source or str(model.folder), [layers[i] for i in sorted(layers)])


def computes_in_fp16(graph: onnx.ModelProto) -> bool:
    """Does the decoder hold activations in float16 (fp16 / q4f16 exports), inside or at its inputs?"""
    f16 = onnx.TensorProto.FLOAT16
    return (any(i.type.tensor_type.elem_type == f16 for i in graph.graph.input)
            or any(n.op_type == "Cast" and attrs(n).get("to") == f16 for n in graph.graph.node))


def check_fp16_overflow(model: Model, graph: onnx.ModelProto, peaks: ActivationPeaks | None = None,
                        prompt: str = "Write a haiku about the sea.") -> CheckItem:
    """peaks: measured on the fp32 reference (the doctor's record); None: on this model's own activations."""
    title = "fp16 overflow risk (largest activation vs 65504)"
    peaks = peaks if peaks is not None else activation_peaks(model, prompt, "this model")
    if not peaks.layers:
        return CheckItem("fp16_overflow", title, "skip", "no per-layer tensors found to measure")
    layer, value, where = peaks.peak
    over = [i for i, (v, _) in enumerate(peaks.layers) if v >= FP16_MAX]
    evidence = (f"largest |activation| per layer on {peaks.source}: max {value:.4g} at layer {layer} ({where}), "
                f"{FP16_MAX / value:.3g}x below 65504" if not over else
                f"largest |activation| per layer on {peaks.source}: {value:.4g} at layer {layer} ({where}); layers "
                f"{over} exceed 65504, the largest float16")
    if not over:
        return CheckItem("fp16_overflow", title, "pass", evidence)
    fix = ("keep the activations fp32 (or bf16), or scale the outlier channels down first (`qwen3vl-lab repair` "
           "folds them into the op before); fp16 turns them into inf/NaN or silent wrong answers "
           "(huggingface/transformers#33294, microsoft/onnxruntime#31626)")
    if computes_in_fp16(graph):
        return CheckItem("fp16_overflow", title, "fail", evidence + "; this decoder computes in float16", fix)
    return CheckItem("fp16_overflow", title, "warn", evidence + "; this decoder computes in float32, so it is not "
                     "affected: a q4f16 / fp16 export of the same weights would overflow", fix)


@dataclass
class ReferenceRecord:
    """What the checklist needs of the fp32 reference, recorded in its turn (the doctor releases it next)."""

    answers: AnswerProbe  # its greedy answer to the checklist prompt, with its logits
    peaks: ActivationPeaks  # its largest activation per layer
    probe: ImageProbe | None = None  # the image probe (when it has a vision graph)


def record_reference(reference: Model, prompt: str = "Write a haiku about the sea.") -> ReferenceRecord:
    return ReferenceRecord(answer_probe(reference, prompt), activation_peaks(reference, prompt, "the fp32 reference"))


def run_checklist(model: Model | str | Path, precision: str = "int4",
                  reference: Model | str | Path | ReferenceRecord | None = None,
                  prompt: str = "Write a haiku about the sea.",
                  vision_reference: Model | ImageProbe | None = None, image=None, image_size: int | None = None) -> Checklist:
    """Every check against `model` (a folder or a loaded Model). `reference` (fp32, or its `record_reference`)
    gives the answer the accuracy_level, KV-cache and graph-optimization lines run on, the quantization noise the
    KV line is judged against, and the fp32 activations of the fp16 line; `vision_reference` (our export of the
    checkpoint, or its `probe_reference` record; default: the reference) the image probe."""
    model = as_model(model, precision)
    ref = reference if reference is None or isinstance(reference, (Model, ReferenceRecord)) else as_model(reference, "fp32")
    if vision_reference is None and isinstance(ref, Model):
        vision_reference = ref
    record = record_reference(ref, prompt) if isinstance(ref, Model) else ref
    answers = record.answers if record is not None else answer_probe(model, prompt, keep_logits=False)
    graph = model.graph()
    image_probe = check_image_probe(model, vision_reference, image, image_size)
    probe = vision_reference if isinstance(vision_reference, ImageProbe) else None
    items = [
        check_accuracy_level(model, graph, answers if record is not None else None),
        check_algorithm(model, graph),
        check_lm_head(graph),
        check_tied_embeddings(model, graph),
        check_qk_norm(model, graph),
        check_genai_config(model),
        check_positions(model),
        check_mrope_layout(model, probe),
        check_deepstack(model),
        check_kv_cache(model, answers),
        check_graph_optimizations(model, answers),
        image_probe,
        check_eos(model),
        check_generation_eos(model),
        check_fp16_overflow(model, graph, record.peaks if record is not None else None, prompt),
    ]
    return Checklist(str(model.folder), items)


__all__ = ["ActivationPeaks", "CheckItem", "Checklist", "ReferenceRecord", "activation_peaks", "check_accuracy_level",
           "check_deepstack", "check_eos", "check_fp16_overflow", "check_generation_eos", "check_genai_config",
           "check_lm_head", "check_positions", "check_qk_norm", "check_tied_embeddings", "computes_in_fp16",
           "fp32_logits", "live_nodes", "needs_fp32_logits", "record_reference", "reference_positions_case",
           "run_checklist"]
