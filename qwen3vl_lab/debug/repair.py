"""`repair`: build candidate INT4 fixes from an fp32 export, score each against fp32, write the best as an export.

    report = repair("OUT", "FIXED", prompts)                     # CLI: qwen3vl-lab repair --model_dir OUT --output_dir FIXED
    print(report.table()); print(report.rule)                     # every candidate, and why the winner won
    rows = sensitivity("OUT", prompts)                            # MatMuls ranked by what fp32 alone in them recovers

The candidates, all built by onnxruntime's MatMulNBitsQuantizer (export/quantize.py) from OUT's fp32 decoder:

    default          the builder's recipe, what `export --precision int4` writes (block 32, sym, accuracy_level 4)
    acc0             accuracy_level 0: fp32 activations in the kernel (level 4 rounds them to int8 per block)
    head_int8        the lm_head at 8 bits
    equalised        activation-aware equalisation (SmoothQuant / AWQ): per input channel k of each site's MatMuls,
                     s_k = 2^round(log2(max|x_k|^a / max|W_k|^(1-a))); x_k / s_k is folded into the op before (the
                     RMSNorm weight, or up_proj's output column for down_proj), W_k * s_k into the MatMuls. Powers
                     of two: the fp32 decoder computes the same numbers bit for bit. a is searched per site (AWQ):
                     the one whose simulated INT4 output error on the calibration inputs is lowest.
    equalised_acc0   both
    mixed_8bit       the most sensitive MatMuls (`sensitivity`) at 8 bits, the rest at 4, within the 4-bit budget
    mixed_fp32       the same MatMuls left fp32
    int8             8 bits everywhere: the reference point the budget excludes
    nncf_awq         NNCF's ONNX weight compression, data-aware AWQ + scale estimation (optional: the [repair] extra)

Scores (against the fp32 export on the calibration prompts, greedy): mean / max KL and top-1 agreement with the
fp32 tokens fed (teacher forced), and free-greedy agreement (share of prompts whose own greedy answer is fp32's);
with a `scorer` (the shapes model: `shapes.calibration.heldout_scorer`) also exact-match accuracy on held-out
scenes the calibration never sees, with its Wilson interval; the decoder's size on disk; decode tok/s of the
teaching decoder (1 prompt, `SPEED_TOKENS` greedy tokens: a rough figure on a shared machine).

The winner rule (`RULE`, printed): among candidates keeping at least `min_four_bit` of the decoder layers' weight
MatMuls at 4 bits and within budget of fp32 (held-out accuracy >= fp32's minus `accuracy_budget` when scored,
else mean KL <= `kl_budget`), the smallest decoder (within 1%); ties go to the better accuracy, then to the
builder's accuracy_level 4 (int8 kernel) over 0, then to the lower KL. If none is within budget, the
best-scoring candidate within the 4-bit budget is written and the report says so.

A foreign export (the original guide's, onnxruntime-genai's) is repaired by repairing our export of its checkpoint
(`qwen3vl-lab export --hf_dir <its checkpoint>`, what the doctor builds for its reference): the fix is a recipe
and a rescaling of the checkpoint's weights, not an edit of another tool's graph.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import UserError
from ..export.decoder_fast import write_fast_decoder
from ..export.files import check_replaceable, folder_or_temporary, replace_folder, staging_folder
from ..export.genai_config import write_genai_config
from ..export.outliers import layer_sites
from ..export.quantize import (
    COPIED_FILES,
    LM_HEAD_OUTPUT,
    QUANTIZATION_FILE,
    ExternalData,
    Int4Recipe,
    carry_initializer,
    link_or_copy,
    matmul_weights,
    quantize_folder,
    read_array,
    set_accuracy_level,
)
from ..generate import generate_step, run_prefill
from ..layout import DECODER_FILE
from ..layouts import read_export_config
from ..model import edited_session
from ..paths import output_dir as checked_output_dir
from ..sampling import greedy
from ..signals import interruption_point
from ..stats import format_accuracy, wilson_interval
from .activations import ChannelStats, collect_channel_stats, int8_blocks
from .compare import compare_recorded
from .inputs import PromptLike, as_specs, open_model, prepare
from .record import record_reference, release
from .simulate import fake_quantize
from .variants import PROCESSOR_FOLDER, export_root, fp32_source, link_processor_files, shared_assets
from .weights import short_name

REPAIR_FILE = "repair.json"
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the AWQ-style grid of migration strengths per site
SPEED_TOKENS = 24
N_STEPS = 12
MIN_FOUR_BIT = 0.9
ACCURACY_BUDGET = 0.03
KL_BUDGET = 0.05
SIZE_TIE = 0.01  # decoders within 1% of the smallest count as the same size (a graph attribute is a few bytes)
RULE = ("winner: among candidates keeping >= {min4:.0%} of the decoder layers' weight MatMuls at 4 bits and within "
        "budget of fp32 ({budget}), the smallest decoder on disk (within 1%); ties: better accuracy, then the "
        "builder's accuracy_level 4 kernel over 0, then lower KL")

Scorer = Callable[[Path], dict]  # a runnable precision folder -> {"correct": int, "total": int, "predictions": [...]}


# -- activation-aware equalisation -----------------------------------------------------------------
@dataclass
class SiteScales:
    """One equalised site: x_k / scales[k] in the op before (`scaled`), W_k * scales[k] in each consumer."""

    layer: int
    kind: str  # "attn_in", "mlp_in", "down_in" (export/outliers.py `layer_sites`)
    scaled: str
    consumers: tuple[str, ...]
    alpha: float
    scales: np.ndarray  # (K,) powers of two
    error_before: float  # simulated INT4 output error of the consumers on the calibration inputs, unscaled
    error_after: float  # ... with these scales

    def to_json(self) -> dict:
        big = np.argsort(-self.scales)[:8]
        return {"layer": self.layer, "kind": self.kind, "scaled": self.scaled, "consumers": list(self.consumers),
                "alpha": self.alpha, "error_before": self.error_before, "error_after": self.error_after,
                "largest_scales": {int(k): float(self.scales[k]) for k in big if self.scales[k] > 1}}


def smooth_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s_k = max|x_k|^a / max|W_k|^(1-a), rounded to powers of two and centred so the median channel
    keeps scale 1 (K,)."""
    x = np.maximum(np.asarray(x_absmax, np.float64), 1e-8)
    w = np.maximum(np.asarray(w_absmax, np.float64), 1e-8)
    e = np.round(np.log2(x ** alpha / w ** (1 - alpha)))
    e -= np.round(np.median(e))
    return np.exp2(np.clip(e, -30, 30)).astype(np.float32)


def simulated_error(x: np.ndarray, weights: Sequence[np.ndarray], scales: np.ndarray, recipe: Int4Recipe) -> float:
    """|Q8?(x / s) Q4(s W) - x W| / |x W| summed over the consumers: the INT4 output error after equalising by s
    (weights (K, N) as the graph holds them; `fake_quantize` rounds as onnxruntime's quantizer does; int8 blocks
    of x when the recipe's accuracy_level is 4)."""
    xs = x / scales  # (rows, K)
    if recipe.accuracy_level == 4:
        xs = int8_blocks(xs, recipe.block_size)
    num = den = 0.0
    for w in weights:
        ref = x @ w  # (rows, N)
        got = xs @ fake_quantize(w * scales[:, None], recipe.bits, recipe.block_size, recipe.symmetric)
        num += float(((got - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return float(np.sqrt(num / max(den, 1e-30)))


def equalisation_scales(fp32: Path, stats: Sequence[ChannelStats], recipe: Int4Recipe,
                        alphas: Sequence[float] = ALPHAS) -> list[SiteScales]:
    """The per-site scales of the AWQ-style search: for each site, the alpha whose simulated INT4 output error on
    the calibration inputs is lowest (alpha 0 with scales all 1 is among them: a site is never made worse)."""
    by_weight = {s.weight: s for s in stats}
    graph = onnx.load(str(fp32 / DECODER_FILE), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    n_layers = sum(1 for w in by_weight if w.endswith("self_attn.q_proj.weight"))
    out = []
    for i in range(n_layers):
        for kind, scaled, consumers in layer_sites(i):
            s = by_weight.get(consumers[0])
            if s is None or s.samples is None or scaled not in inits or not all(c in inits for c in consumers):
                continue
            interruption_point()
            weights = [read_array(inits[c], fp32).astype(np.float32) for c in consumers]  # (K, N) each
            w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # (K,)
            x = s.samples.astype(np.float32)
            ones = np.ones(len(w_absmax), np.float32)
            before = simulated_error(x, weights, ones, recipe)
            best = (before, 0.0, ones)
            for a in alphas:
                sc = smooth_scales(s.absmax, w_absmax, a)
                err = simulated_error(x, weights, sc, recipe)
                if err < best[0]:
                    best = (err, float(a), sc)
            out.append(SiteScales(i, kind, scaled, consumers, best[1], best[2], before, best[0]))
    return out


def _rescaled_initializers(sites: Sequence[SiteScales]) -> dict[str, list[tuple[str, np.ndarray]]]:
    """initializer -> [(how, scales)]: "divide" a norm weight (1-D) or up_proj's output columns; "multiply" the
    consumers' input rows ((K, N) as the graph holds them)."""
    ops: dict[str, list] = {}
    for s in sites:
        if np.all(s.scales == 1):
            continue
        ops.setdefault(s.scaled, []).append(("divide", s.scales))
        for c in s.consumers:
            ops.setdefault(c, []).append(("multiply", s.scales))
    return ops


def _apply(w: np.ndarray, ops: list[tuple[str, np.ndarray]]) -> np.ndarray:
    w = np.array(w, np.float32)
    for how, s in ops:
        if how == "multiply":
            w *= s[:, None]  # rows k of (K, N)
        elif w.ndim == 1:
            w /= s  # a norm weight (K,)
        else:
            w /= s[None, :]  # up_proj (K=hidden, N=intermediate): output column c feeds down_proj's input c
    return w


def equalised_folder(fp32: Path, out: Path, sites: Sequence[SiteScales]) -> Path:
    """A copy of the fp32 precision folder whose decoder carries the equalisation `sites` (no sites: a plain copy);
    qwen3vl_lab.json keeps precision fp32 and records the scales under "equalised"."""
    fp32, out = Path(fp32), Path(out)
    ops = _rescaled_initializers(sites)
    model = onnx.load(str(fp32 / DECODER_FILE), load_external_data=False)
    graph = model.graph
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent, f".{out.name}-", name="the equalised folder", shown=out) as staging:
        data = ExternalData(staging / (DECODER_FILE + ".data"))
        try:
            new = [data.tensor(t.name, _apply(read_array(t, fp32), ops[t.name])) if t.name in ops
                   else carry_initializer(t, fp32, data) for t in graph.initializer]
        finally:
            data.close()
        graph.ClearField("initializer")
        graph.initializer.extend(new)
        onnx.save_model(model, str(staging / DECODER_FILE))
        for name in COPIED_FILES:
            if (fp32 / name).is_file():
                shutil.copy2(fp32 / name, staging / name)
        genai = read_export_config(fp32)
        if ops:
            genai["qwen3vl_lab"]["equalised"] = {"method": "SmoothQuant/AWQ-style per-channel power-of-two scales",
                                                 "sites": [s.to_json() for s in sites if ops.get(s.scaled)]}
        write_genai_config(staging, genai)
        write_fast_decoder(staging)
        replace_folder(staging, out, what="equalised fp32 folder")
    return out


# -- sensitivity --------------------------------------------------------------------------------------
@dataclass
class Sensitivity:
    """One MatMul kept fp32 while every other stays quantized: how close to fp32 that brings the model."""

    matmul: str  # the weight's short name
    weight: str
    mean_kl: float
    top1: float
    recovered: float  # share of the quantized model's mean KL this MatMul alone removes (1 = all of it)

    def to_json(self) -> dict:
        return asdict(self)


def _restore_fp32(graph: onnx.ModelProto, node_name: str, weight: str, w: np.ndarray) -> onnx.ModelProto:
    """An in-memory copy of the quantized graph whose MatMulNBits `node_name` is the fp32 MatMul again."""
    g = onnx.ModelProto()
    g.CopyFrom(graph)
    for i, n in enumerate(g.graph.node):
        if n.name == node_name:
            fp32 = helper.make_node("MatMul", [n.input[0], weight + ".fp32"], list(n.output), name=n.name)
            g.graph.node.remove(n)
            g.graph.node.insert(i, fp32)
            break
    g.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), weight + ".fp32"))
    return g


def sensitivity(int4_folder: str | Path, fp32: str | Path, prompts: Sequence[PromptLike] | PromptLike | None = None, *,
                records=None, n_steps: int = N_STEPS, include_lm_head: bool = False,
                progress: Callable[[str], None] | None = None) -> list[Sensitivity]:
    """Each MatMulNBits of the INT4 folder, alone put back to its fp32 weight (an edited in-memory graph; nothing
    written), scored against fp32 on the prompts: ranked, the MatMul that recovers most first.
    `records`: the fp32 reference already recorded on the same prompts (`record.record_reference`)."""
    fp32 = fp32_source(fp32)
    specs = as_specs(prompts)
    records = records if records is not None else record_reference(fp32, specs, n_steps)
    test = open_model(int4_folder, "fp32")
    graph = test.graph()
    fp32_graph = onnx.load(str(fp32 / DECODER_FILE), load_external_data=False).graph
    fp32_inits = {t.name: t for t in fp32_graph.initializer}
    by_output = {n.output[0]: n.input[1] for n in fp32_graph.node if n.op_type == "MatMul" and n.input[1] in fp32_inits}
    try:
        base = compare_recorded(records, test, specs, n_steps, free=False).mean_kl
        rows = []
        for n in [n for n in graph.graph.node if n.op_type == "MatMulNBits"]:
            weight = by_output.get(n.output[0])
            if weight is None or (LM_HEAD_OUTPUT in n.output and not include_lm_head):
                continue
            interruption_point()
            if progress:
                progress(short_name(weight))
            edited = _restore_fp32(graph, n.name, weight, read_array(fp32_inits[weight], fp32))
            test.decoder_session = edited_session(test, edited)
            test.__dict__.pop("teaching_decoder", None)
            cmp = compare_recorded(records, test, specs, n_steps, free=False)
            rows.append(Sensitivity(short_name(weight), weight, cmp.mean_kl, cmp.agreement,
                                    1.0 - cmp.mean_kl / base if base > 0 else 0.0))
    finally:
        release(test)
    return sorted(rows, key=lambda r: r.mean_kl)


# -- candidates -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """One fix to try: a recipe, on the plain or the equalised fp32 decoder, with per-MatMul exceptions."""

    name: str
    recipe: Int4Recipe
    equalised: bool = False
    bits_for: tuple[tuple[str, int | None], ...] = ()  # weight -> bits (None: fp32): mixed precision
    what: str = ""
    method: str = "onnxruntime"  # "onnxruntime" (MatMulNBitsQuantizer) or "nncf" (NNCF's data-aware AWQ)

    def to_json(self) -> dict:
        return {"name": self.name, "recipe": self.recipe.name, "equalised": self.equalised, "method": self.method,
                "bits_for": {w: b for w, b in self.bits_for}, "what": self.what}


def base_candidates() -> list[Candidate]:
    """The candidates that need no measurement to define (mixed precision comes from `sensitivity`)."""
    d = Int4Recipe()
    return [
        Candidate("default", d, what="the builder's recipe, as `export --precision int4` writes it"),
        Candidate("acc0", replace(d, accuracy_level=0), what="accuracy_level 0: fp32 activations in MatMulNBits"),
        Candidate("head_int8", replace(d, lm_head="int8"), what="lm_head at 8 bits"),
        Candidate("equalised", d, equalised=True, what="activation-aware equalisation (SmoothQuant/AWQ scales)"),
        Candidate("equalised_acc0", replace(d, accuracy_level=0), equalised=True,
                  what="equalisation + accuracy_level 0"),
        Candidate("int8", replace(d, bits=8, lm_head="int8"), what="8 bits everywhere (over the 4-bit budget)"),
        Candidate("nncf_awq", replace(d, lm_head="int8"), method="nncf",
                  what="NNCF data-aware AWQ + scale estimation (int4 sym b32; lm_head int8 per channel)"),
    ]


def mixed_candidates(ranked: Sequence[Sensitivity], n_layer_matmuls: int, min_four_bit: float) -> list[Candidate]:
    """The most sensitive MatMuls, as many as the 4-bit budget allows, at 8 bits and at fp32."""
    allowed = int(np.floor(n_layer_matmuls * (1 - min_four_bit) + 1e-9))
    chosen = [r.weight for r in ranked if r.recovered > 0][:allowed]
    if not chosen:
        return []
    names = ", ".join(short_name(w) for w in chosen)
    d = Int4Recipe()
    return [Candidate("mixed_8bit", d, bits_for=tuple((w, 8) for w in chosen), what=f"8 bits: {names}"),
            Candidate("mixed_fp32", d, bits_for=tuple((w, None) for w in chosen), what=f"fp32: {names}")]


@dataclass
class CandidateResult:
    candidate: Candidate
    folder: str = ""
    mean_kl: float = float("nan")
    max_kl: float = float("nan")
    top1: float = float("nan")
    free_same: float = float("nan")  # share of prompts whose free greedy answer equals fp32's
    correct: int | None = None
    total: int | None = None
    decoder_bytes: int = 0
    decode_tok_s: float = float("nan")
    four_bit: tuple[int, int] = (0, 0)  # decoder-layer weight MatMuls at 4 bits, of how many
    seconds: float = 0.0
    error: str | None = None
    predictions: list[str] = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def accuracy(self) -> float | None:
        return None if not self.total else self.correct / self.total

    @property
    def four_bit_share(self) -> float:
        return self.four_bit[0] / self.four_bit[1] if self.four_bit[1] else 0.0

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("candidate", "predictions")}
        d.update(candidate=self.candidate.to_json(), accuracy=self.accuracy, four_bit_share=self.four_bit_share)
        if self.total:
            d["interval"] = list(wilson_interval(self.correct, self.total))
        return d


def _layer_matmuls(fp32: Path) -> list[str]:
    graph = onnx.load(str(fp32 / DECODER_FILE), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    return [w for n, w in matmul_weights(graph, inits).items() if ".layers." in w]


def four_bit_count(folder: Path, layer_weights: Sequence[str]) -> tuple[int, int]:
    """(decoder-layer weight MatMuls quantized at 4 bits, all of them) from quantization.json."""
    record = json.loads((Path(folder) / QUANTIZATION_FILE).read_text(encoding="utf-8"))
    bits = {n["weight"]: n["bits"] for n in record["nodes"]}
    return sum(1 for w in layer_weights if bits.get(w) == 4), len(layer_weights)


def decoder_bytes(folder: Path) -> int:
    return sum((Path(folder) / f).stat().st_size for f in (DECODER_FILE, DECODER_FILE + ".data")
               if (Path(folder) / f).is_file())


def decode_speed(folder: Path, prompt: PromptLike, tokens: int = SPEED_TOKENS) -> float:
    """Greedy decode tokens per second of the teaching decoder (prefill excluded), `tokens` steps, no EOS stop."""
    model = open_model(folder, "fp32")
    try:
        p = prepare(model, prompt)
        seconds = [s.decoder_seconds for s in generate_step(model, p, greedy, tokens, eos_token_ids=[]) if s.index > 0]
    finally:
        release(model)
    return len(seconds) / sum(seconds) if seconds and sum(seconds) > 0 else float("nan")


def build_candidate(c: Candidate, fp32: Path, equalised: Path | None, root: Path, assets: Path,
                    specs: Sequence[PromptLike] = ()) -> Path:
    """root/<name>/: the candidate's INT4 folder (embedding, vision and pytorch/ hard-linked from `assets`)."""
    src = equalised if c.equalised else fp32
    folder = root / c.name
    if folder.exists():
        shutil.rmtree(folder)
    if c.method == "nncf":
        nncf_folder(src, folder, c.recipe, specs, assets)
    else:
        quantize_folder(src, folder, c.recipe, progress=False, link=True, assets=assets, bits_for=dict(c.bits_for))
    link_processor_files(assets, folder)
    return folder


def score_candidate(c: Candidate, folder: Path, records, specs, n_steps: int, layer_weights: Sequence[str],
                    scorer: Scorer | None, speed_prompt: PromptLike) -> CandidateResult:
    t0 = time.perf_counter()
    test = open_model(folder, "fp32")
    try:
        cmp = compare_recorded(records, test, specs, n_steps)
    finally:
        release(test)
    r = CandidateResult(c, str(folder), cmp.mean_kl, float(cmp.kl.max()) if len(cmp.kl) else 0.0, cmp.agreement,
                        float(np.mean([d is None for d in cmp.first_divergences])) if cmp.free else float("nan"),
                        decoder_bytes=decoder_bytes(folder), four_bit=four_bit_count(folder, layer_weights))
    if scorer is not None:
        got = scorer(folder)
        r.correct, r.total, r.predictions = int(got["correct"]), int(got["total"]), list(got.get("predictions", []))
    r.decode_tok_s = decode_speed(folder, speed_prompt)
    r.seconds = time.perf_counter() - t0
    return r


# -- NNCF's data-aware weight compression (the maintained library's AWQ) --------------------------------------
def nncf_installed() -> bool:
    try:
        return importlib.util.find_spec("nncf") is not None
    except ValueError:
        return False


def decoder_feeds(fp32: Path, specs: Sequence[PromptLike]) -> list[dict[str, np.ndarray]]:
    """The fp32 decoder's prefill inputs for each calibration prompt (what a calibration data reader feeds)."""
    model = open_model(fp32, "fp32")
    real, feeds = model.decoder, []

    class Recorder:  # the decoder session, keeping a copy of every feed it runs
        def __getattr__(self, name):
            return getattr(real, name)

        def run(self, names, f, *args, **kwargs):
            feeds.append({k: np.array(v) for k, v in f.items()})
            return real.run(names, f, *args, **kwargs)

    model.decoder_session = Recorder()
    model.__dict__.pop("teaching_decoder", None)
    try:
        for spec in specs:
            run_prefill(model, prepare(model, spec))
    finally:
        release(model)
    return feeds


def nncf_folder(fp32: Path, out: Path, recipe: Int4Recipe, specs: Sequence[PromptLike], assets: Path) -> Path:
    """NNCF's `compress_weights` on the fp32 decoder (INT4 symmetric, group 32, every layer MatMul; data-aware
    AWQ and scale estimation on the calibration prompts' decoder inputs; NNCF keeps the lm_head at int8 per
    channel), MatMulNBits' accuracy_level set to the recipe's, written as a runnable INT4 folder."""
    if not nncf_installed():
        raise UserError("the nncf_awq candidate needs NNCF: pip install 'qwen3vl-lab[repair]' (or nncf), "
                        "or leave it out of --candidates")
    import nncf  # noqa: PLC0415 (optional dependency)
    from nncf.onnx.quantization.backend_parameters import BackendParameters  # noqa: PLC0415

    graph = onnx.load(str(fp32 / DECODER_FILE), load_external_data=False)
    # optional inputs with a default (deepstack_embeds, logits_to_keep) are initializers too: NNCF would compress
    # them as weights; it sees them as plain inputs, and they are put back afterwards
    inputs = {i.name for i in graph.graph.input}
    defaults = [t for t in graph.graph.initializer if t.name in inputs]
    for t in defaults:
        graph.graph.initializer.remove(t)
    params = nncf.AdvancedCompressionParameters(backend_params={BackendParameters.EXTERNAL_DATA_DIR: str(fp32.resolve())})
    compressed = nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=recipe.block_size,
                                       ratio=1.0, dataset=nncf.Dataset(decoder_feeds(fp32, specs)), awq=True,
                                       scale_estimation=True, advanced_parameters=params)
    compressed.graph.initializer.extend(defaults)
    nodes = []
    for n in compressed.graph.node:
        if n.op_type == "MatMulNBits":
            set_accuracy_level(n, recipe.accuracy_level)
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            nodes.append({"node": n.name, "weight": n.input[1].removesuffix("_quantized"), "bits": attrs["bits"],
                          "block_size": attrs["block_size"], "accuracy_level": recipe.accuracy_level})
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent, f".{out.name}-", name="the nncf folder", shown=out) as staging:
        onnx.save_model(compressed, str(staging / DECODER_FILE), save_as_external_data=True,
                        location=DECODER_FILE + ".data")
        for name in COPIED_FILES:
            if (assets / name).is_file():
                link_or_copy(assets / name, staging / name, True)
        genai = read_export_config(fp32)
        genai["qwen3vl_lab"]["precision"] = "int4"
        genai["qwen3vl_lab"]["recipe"] = {**recipe.to_dict(), "quantizer": f"nncf {nncf.__version__} compress_weights"}
        write_genai_config(staging, genai)
        (staging / QUANTIZATION_FILE).write_text(json.dumps({
            "quantizer": f"nncf {nncf.__version__} compress_weights (INT4_SYM, awq, scale_estimation)",
            "nodes": nodes}, indent=2) + "\n", encoding="utf-8")
        replace_folder(staging, out, what="nncf int4 folder")
    return out


# -- the winner ------------------------------------------------------------------------------------------
def within_budget(r: CandidateResult, fp32_accuracy: float | None, accuracy_budget: float, kl_budget: float) -> bool:
    if r.error is not None:
        return False
    if fp32_accuracy is not None and r.accuracy is not None:
        return r.accuracy >= fp32_accuracy - accuracy_budget - 1e-12
    return r.mean_kl <= kl_budget


def pick_winner(rows: Sequence[CandidateResult], fp32_accuracy: float | None, *, min_four_bit: float = MIN_FOUR_BIT,
                accuracy_budget: float = ACCURACY_BUDGET, kl_budget: float = KL_BUDGET) -> tuple[CandidateResult, bool]:
    """(the winner, whether it is within budget): see `RULE`."""
    eligible = [r for r in rows if r.error is None and r.four_bit_share >= min_four_bit - 1e-12]
    if not eligible:
        raise UserError("no candidate could be built within the 4-bit budget; see the table for each one's error")
    ok = [r for r in eligible if within_budget(r, fp32_accuracy, accuracy_budget, kl_budget)]
    score = lambda r: (-(r.accuracy if r.accuracy is not None else 0.0), -r.candidate.recipe.accuracy_level,  # noqa: E731
                       r.mean_kl)
    if ok:
        smallest = min(r.decoder_bytes for r in ok)
        same_size = [r for r in ok if r.decoder_bytes <= smallest * (1 + SIZE_TIE)]
        return min(same_size, key=score), True
    return min(eligible, key=score), False


@dataclass
class RepairReport:
    """What `repair` measured and wrote."""

    model_dir: str
    output_dir: str
    rows: list[CandidateResult]
    winner: str
    within_budget: bool
    rule: str
    fp32_correct: int | None = None
    fp32_total: int | None = None
    fp32_kl_check: float = 0.0  # max |logit| difference, equalised fp32 vs fp32, on the first prompt
    sensitivity: list[Sensitivity] = field(default_factory=list)
    sites: list[SiteScales] = field(default_factory=list)
    stats: list[ChannelStats] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the written export lacks, said on stderr and in --json

    @property
    def fp32_accuracy(self) -> float | None:
        return None if not self.fp32_total else self.fp32_correct / self.fp32_total

    def row(self, name: str) -> CandidateResult:
        return next(r for r in self.rows if r.name == name)

    def table(self) -> str:
        acc = self.fp32_total is not None
        head = (f"{'candidate':15s} {'4-bit':>6s} {'MB':>6s} {'tok/s':>6s} {'mean KL':>8s} {'max KL':>7s} {'top-1':>6s} "
                f"{'free':>5s}" + (f"  {'held-out accuracy':28s}" if acc else "") + "  what")
        lines = [head, "-" * len(head)]
        if acc:
            lines.append(f"{'fp32':15s} {'':>6s} {'':>6s} {'':>6s} {'':>8s} {'':>7s} {'':>6s} {'':>5s}  "
                         f"{format_accuracy(self.fp32_correct, self.fp32_total):28s}  the reference")
        for r in self.rows:
            mark = "*" if r.name == self.winner else " "
            if r.error:
                lines.append(f"{r.name:14s}{mark} failed: {r.error}")
                continue
            a = f"  {format_accuracy(r.correct, r.total):28s}" if acc and r.total else ("  " + " " * 28 if acc else "")
            lines.append(f"{r.name:14s}{mark} {r.four_bit_share:6.0%} {r.decoder_bytes / 2**20:6.1f} {r.decode_tok_s:6.0f} "
                         f"{r.mean_kl:8.4f} {r.max_kl:7.3f} {r.top1:6.0%} {r.free_same:5.0%}{a}  {r.candidate.what}")
        return "\n".join(lines)

    def summary(self) -> str:
        w = self.row(self.winner)
        status = "within budget" if self.within_budget else "NO candidate is within budget: the best one was written"
        return f"{self.rule}\nwinner: {w.name} ({w.candidate.what}); {status}; written to {self.output_dir}"

    def to_json(self) -> dict:
        return {"model_dir": self.model_dir, "output_dir": self.output_dir, "winner": self.winner,
                "within_budget": self.within_budget, "rule": self.rule,
                "fp32": {"correct": self.fp32_correct, "total": self.fp32_total, "accuracy": self.fp32_accuracy},
                "equalised_fp32_max_abs_logit_diff": self.fp32_kl_check,
                "candidates": [r.to_json() for r in self.rows],
                "sensitivity": [s.to_json() for s in self.sensitivity],
                "equalisation": [s.to_json() for s in self.sites if np.any(s.scales != 1)],
                "outlier_inputs": [{**s.to_json(), "outliers": list(s.outliers[:16]),
                                    "outlier_absmax": [float(s.absmax[k]) for k in s.outliers[:16]]}
                                   for s in self.stats if s.outliers],
                "seconds": self.seconds, "notes": self.notes}


# -- writing the winner -----------------------------------------------------------------------------------
def _write_export(out: Path, fp32_src: Path, int4_src: Path, processor: Path | None, report: RepairReport) -> None:
    """out/: cpu-fp32 (the decoder the winner was quantized from), cpu-int4 (the winner), pytorch/, repair.json."""
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent, f".{out.name}.tmp-", shown=out) as tmp:
        for src, name in ((fp32_src, "cpu-fp32"), (int4_src, "cpu-int4")):
            shutil.copytree(src, tmp / name, copy_function=shutil.copy2, ignore=shutil.ignore_patterns(PROCESSOR_FOLDER))
        if processor is not None and processor.is_dir():
            shutil.copytree(processor, tmp / PROCESSOR_FOLDER)
        try:
            write_fast_decoder(tmp / "cpu-int4")
        except UserError as e:  # a graph another library wrote (nncf_awq): it runs, but not through --fast
            report.notes.append(f"cpu-int4 has no model-fast.onnx, so `generate --fast` refuses it ({e})")
        (tmp / REPAIR_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        replace_folder(tmp, out, what="repaired export")


def _max_logit_diff(a: Path, b: Path, prompt: PromptLike) -> float:
    """max |logits| difference of two fp32 folders on one prompt's prefill (the equalisation changes nothing)."""
    from ..taps import run_with_cache  # noqa: PLC0415 (light)

    out = []
    for folder in (a, b):
        m = open_model(folder, "fp32")
        try:
            out.append(run_with_cache(m, prepare(m, prompt), [])[0])
        finally:
            release(m)
    return float(np.abs(out[0] - out[1]).max())


def repair(model_dir: str | Path, output_dir: str | Path, prompts: Sequence[PromptLike] | PromptLike | None = None, *,
           scorer: Scorer | None = None, fp32_score: dict | None = None, work_dir: str | Path | None = None,
           n_steps: int = N_STEPS, min_four_bit: float = MIN_FOUR_BIT, accuracy_budget: float = ACCURACY_BUDGET,
           kl_budget: float = KL_BUDGET, candidates: Sequence[str] | None = None,
           log: Callable[[str], None] = print) -> RepairReport:
    """Build every candidate from `model_dir`'s fp32 export, score it, write the winner to `output_dir` as an export.

    prompts: calibration prompts (text, PromptSpec with an image, ...), used for the activation statistics, the
    equalisation search, the sensitivity ranking and the KL / agreement scores. scorer: a folder -> held-out
    accuracy callable (the shapes model: `shapes.calibration.heldout_scorer`), run on fp32 too unless `fp32_score`
    gives its result. candidates: names to build (default: all). work_dir: keep the candidates there (default: a
    temporary folder, removed at the end)."""
    t_start = time.perf_counter()
    fp32 = fp32_source(model_dir)
    out = checked_output_dir(output_dir, "--output_dir")
    check_replaceable(out)
    if out.resolve() == export_root(fp32).resolve() or fp32.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--output_dir {out} holds the export being repaired; pick a new folder")
    if not 0 < min_four_bit <= 1:
        raise UserError(f"min_four_bit must be in (0, 1], got {min_four_bit}")
    specs = as_specs(prompts)
    wanted = set(candidates) if candidates is not None else None
    known = {c.name for c in base_candidates()} | {"mixed_8bit", "mixed_fp32"}
    if wanted is None and not nncf_installed():
        log("nncf_awq: NNCF is not installed (pip install 'qwen3vl-lab[repair]'); that candidate is reported, not built")
    if wanted is not None and wanted - known:
        raise UserError(f"unknown candidate {sorted(wanted - known)[0]!r}; choose from {', '.join(sorted(known))}")
    with folder_or_temporary(work_dir, "qwen3vl-repair-") as root:
        root.mkdir(parents=True, exist_ok=True)
        assets = shared_assets(fp32, root)
        log(f"calibration: {len(specs)} prompt(s); recording fp32 ({n_steps} greedy steps each)")
        records = record_reference(fp32, specs, n_steps)
        stats = collect_channel_stats(fp32, specs)
        layer_weights = _layer_matmuls(fp32)
        fp32_result = fp32_score if fp32_score is not None or scorer is None else scorer(fp32)
        todo = [c for c in base_candidates() if wanted is None or c.name in wanted]
        sites: list[SiteScales] = []
        equalised = None
        diff = 0.0
        if any(c.equalised for c in todo):
            log("equalisation: searching per-site scales on the calibration inputs")
            sites = equalisation_scales(fp32, stats, Int4Recipe())
            equalised = equalised_folder(fp32, root / "fp32-equalised", sites)
            link_processor_files(assets, equalised)  # its own export root: the checkpoint's image settings
            diff = _max_logit_diff(fp32, equalised, specs[0])
        rows: list[CandidateResult] = []

        def run(c: Candidate) -> CandidateResult:
            log(f"candidate {c.name}: {c.what}")
            try:
                folder = build_candidate(c, fp32, equalised, root / "candidates", assets, specs)
                r = score_candidate(c, folder, records, specs, n_steps, layer_weights, scorer, specs[0])
            except UserError as e:
                r = CandidateResult(c, error=str(e))
            except Exception as e:  # a candidate onnxruntime or a library refuses: its row fails, not the repair
                r = CandidateResult(c, error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:240]}")
            rows.append(r)
            return r

        for c in todo:
            run(c)
        ranked: list[Sensitivity] = []
        if wanted is None or wanted & {"mixed_8bit", "mixed_fp32"}:
            default = next((r for r in rows if r.name == "default" and r.error is None), None)
            if default is None:
                default = run(base_candidates()[0])
            log("sensitivity: each MatMul alone back to fp32")
            ranked = sensitivity(default.folder, fp32, specs, records=records, n_steps=n_steps)
            for c in mixed_candidates(ranked, len(layer_weights), min_four_bit):
                if wanted is None or c.name in wanted:
                    run(c)
        fp32_acc = None
        if fp32_result is not None:
            fp32_acc = fp32_result["correct"] / fp32_result["total"]
        winner, ok = pick_winner(rows, fp32_acc, min_four_bit=min_four_bit, accuracy_budget=accuracy_budget,
                                 kl_budget=kl_budget)
        budget = (f"held-out accuracy >= fp32 - {accuracy_budget:.0%}" if fp32_acc is not None
                  else f"mean KL <= {kl_budget}")
        report = RepairReport(str(model_dir), str(out), rows, winner.name, ok, RULE.format(min4=min_four_bit, budget=budget),
                              None if fp32_result is None else int(fp32_result["correct"]),
                              None if fp32_result is None else int(fp32_result["total"]), diff, ranked, sites, stats)
        fp32_src = equalised if winner.candidate.equalised else fp32
        report.seconds = time.perf_counter() - t_start
        _write_export(out, fp32_src, Path(winner.folder), export_root(fp32) / PROCESSOR_FOLDER, report)
    return report


__all__ = ["ALPHAS", "Candidate", "CandidateResult", "REPAIR_FILE", "RULE", "RepairReport", "Sensitivity", "SiteScales",
           "base_candidates", "decode_speed", "equalisation_scales", "equalised_folder", "mixed_candidates",
           "pick_winner", "repair", "sensitivity", "simulated_error", "smooth_scales"]
