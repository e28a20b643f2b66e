"""What goes INTO each weight MatMul of the decoder: per input channel statistics, and the error that matters.

    stats = collect_channel_stats("OUT", prompts)           # fp32 export; text and image prompts
    for s in stats: print(s.matmul, s.ratio, s.outliers)    # e.g. layers.1.mlp.down_proj  1040.0  (68, 78)
    errs = weighted_errors("OUT", "OUT/cpu-int4", prompts)   # or stats=stats (its samples are kept)
    print(format_weighted(errs))                            # plain vs activation-weighted error, per MatMul

Activation outliers (LLM.int8(), SmoothQuant, "Massive activations in LLMs"): a few fixed input channels of a
MatMul carry values 20-1000x the median channel. The plain weight error |W - Q(W)| / |W| cannot see them: the
weights those channels multiply are no worse rounded than the rest. What the model feels is the output error,

    weighted error = |X (W - Q(W))| / |X W|        X: (tokens, K) the MatMul's real fp32 inputs

(the quantity GPTQ and AWQ minimise), and at accuracy_level 4 also the int8 rounding of X itself, per block of
`block_size` along K with scale absmax / 127 (`kernel_error`: |Q8(X) Q(W) - X W| / |X W|).

Statistics come from the fp32 export's own graph, tapped (taps.py: the MatMul inputs added as outputs of an
in-memory copy; nothing written), one prefill per calibration prompt. Per input channel k of each MatMul:
absmax[k] = max over tokens and prompts of |x_k|, mean_abs[k] = mean |x_k|; `median` is the median of absmax
over channels, `ratio` = max(absmax) / median, `outliers` the channels with absmax >= `outlier_ratio` x median
(largest first). MatMuls that read the same tensor (q/k/v, gate/up) share one statistic. Up to `max_rows`
input rows per MatMul are kept (`samples`, evenly spaced over tokens) for the weighted errors, so memory
stays bounded on a 2B model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ..export.quantize import read_array
from ..model import Model
from ..taps import run_with_cache
from .inputs import PromptLike, as_model, as_specs, prepare
from .layers import matmul_inputs
from .weights import decoder_file, fp32_weights_by_output, iter_quantized, map_array, short_name

OUTLIER_RATIO = 16.0  # a channel >= 16x the median channel's absmax is an outlier (real ones: 20-1000x)
MAX_ROWS = 512  # input rows kept per MatMul for the weighted errors
EPS = 1e-30


@dataclass
class ChannelStats:
    """One weight MatMul's input, per channel, over the calibration prompts."""

    matmul: str  # short name of the weight, e.g. "layers.1.mlp.down_proj" (`weights.short_name`)
    node: str  # the graph's MatMul node
    tensor: str  # the graph tensor it reads
    weight: str  # the weight initializer (HF name in our exports)
    absmax: np.ndarray  # (K,) max |x_k|
    mean_abs: np.ndarray  # (K,) mean |x_k|
    tokens: int  # rows seen
    outlier_ratio: float = OUTLIER_RATIO
    samples: np.ndarray | None = field(default=None, repr=False)  # (<= max_rows, K) float32 inputs

    @property
    def median(self) -> float:
        return float(np.median(self.absmax))

    @property
    def ratio(self) -> float:
        """Largest channel's absmax over the median channel's."""
        med = self.median
        return float(self.absmax.max() / med) if med > 0 else float("inf")

    @property
    def outliers(self) -> tuple[int, ...]:
        """Channels with absmax >= outlier_ratio x median, largest first."""
        med = self.median
        if med <= 0:
            return ()
        order = np.argsort(-self.absmax)
        return tuple(int(k) for k in order if self.absmax[k] >= self.outlier_ratio * med)

    def channel_ratios(self) -> np.ndarray:
        """(K,) absmax / median: what the doctor draws per channel."""
        return self.absmax / max(self.median, EPS)

    def to_json(self) -> dict:
        return {"matmul": self.matmul, "node": self.node, "tensor": self.tensor, "weight": self.weight,
                "tokens": self.tokens, "median": self.median, "ratio": self.ratio, "outliers": list(self.outliers),
                "outlier_absmax": [float(self.absmax[k]) for k in self.outliers]}


class _Accumulator:
    """Running absmax / sum |x| / rows of one tensor, plus evenly spaced kept rows."""

    def __init__(self, k: int):
        self.absmax = np.zeros(k, np.float32)
        self.sum_abs = np.zeros(k, np.float64)
        self.rows = 0
        self.kept: list[np.ndarray] = []

    def add(self, x: np.ndarray, keep: int) -> None:
        x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])  # (rows, K)
        a = np.abs(x)
        self.absmax = np.maximum(self.absmax, a.max(axis=0))
        self.sum_abs += a.sum(axis=0, dtype=np.float64)
        self.rows += x.shape[0]
        if keep > 0:
            idx = np.linspace(0, x.shape[0] - 1, min(keep, x.shape[0])).round().astype(int)
            self.kept.append(x[np.unique(idx)].copy())


def weight_matmuls(graph: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node, input tensor, weight) of every decoder weight MatMul / MatMulNBits (lm_head included)."""
    return [(node, tensor, weight) for node, tensor, weight, _, _ in matmul_inputs(graph)]


def collect_channel_stats(model: Model | str | Path, prompts: Sequence[PromptLike] | PromptLike | None = None, *,
                          image=None, image_size: int | None = None, outlier_ratio: float = OUTLIER_RATIO,
                          max_rows: int = MAX_ROWS, include_lm_head: bool = False) -> list[ChannelStats]:
    """Per input channel statistics of every weight MatMul of the fp32 decoder over the calibration prompts
    (text, or text + image: `image` adds an image version of each text prompt, as in `compare`).

    model: an export folder (its fp32 precision is read) or a loaded fp32 Model. max_rows: input rows kept per
    MatMul (`ChannelStats.samples`) for `weighted_errors`; 0 keeps none."""
    model = as_model(model, "fp32")
    specs = as_specs(prompts, image, image_size)
    mm = [m for m in weight_matmuls(model.graph()) if include_lm_head or short_name(m[2]) != "lm_head"]
    tensors = list(dict.fromkeys(t for _, t, _ in mm))
    acc: dict[str, _Accumulator] = {}
    keep = max_rows // max(len(specs), 1) if max_rows else 0
    for spec in specs:
        _, cache = run_with_cache(model, prepare(model, spec), tensors)
        for t in tensors:
            if t in cache:
                x = cache[t]
                acc.setdefault(t, _Accumulator(x.shape[-1])).add(x, keep)
    out = []
    for node, t, w in mm:
        if t not in acc:
            continue
        a = acc[t]
        samples = np.concatenate(a.kept) if a.kept else None
        out.append(ChannelStats(short_name(w), node, t, w, a.absmax, (a.sum_abs / max(a.rows, 1)).astype(np.float32),
                                a.rows, outlier_ratio, samples))
    return out


# -- activation-weighted error ----------------------------------------------------------------------
@dataclass
class WeightedError:
    """One MatMul: plain weight error beside the output error on the real inputs."""

    matmul: str
    plain: float  # |W - Q(W)| / |W|
    weighted: float  # |X (W - Q(W))| / |X W|
    kernel: float | None  # |Q8(X) Q(W) - X W| / |X W| with accuracy_level 4's int8 activations; None otherwise
    bits: int
    block_size: int
    accuracy_level: int
    outliers: tuple[int, ...] = ()  # the input's outlier channels (ChannelStats.outliers)

    def to_json(self) -> dict:
        return {"matmul": self.matmul, "plain": self.plain, "weighted": self.weighted, "kernel": self.kernel,
                "bits": self.bits, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "outliers": list(self.outliers)}


def int8_blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    """x (rows, K) rounded as MatMulNBits accuracy_level 4 does: symmetric int8 per block of `block_size` along K,
    scale = block absmax / 127."""
    rows, k = x.shape
    pad = (-k) % block_size
    xb = np.pad(x, ((0, 0), (0, pad))).reshape(rows, -1, block_size)  # (rows, blocks, bs)
    scale = np.abs(xb).max(axis=-1, keepdims=True) / 127.0
    q = np.round(xb / np.where(scale > 0, scale, 1.0)) * scale
    return q.reshape(rows, -1)[:, :k]


def output_errors(x: np.ndarray, w: np.ndarray, wq: np.ndarray, *, accuracy_level: int = 0,
                  block_size: int = 32) -> tuple[float, float, float | None]:
    """(plain, weighted, kernel) errors of W (K, N) -> Wq on inputs x (rows, K); see `WeightedError`."""
    x64, w64, q64 = (np.asarray(a, np.float64) for a in (x, w, wq))
    ref = x64 @ w64  # (rows, N)
    ref_norm = max(float(np.linalg.norm(ref)), EPS)
    plain = float(np.linalg.norm(w64 - q64) / max(np.linalg.norm(w64), EPS))
    weighted = float(np.linalg.norm(x64 @ (w64 - q64)) / ref_norm)
    kernel = None
    if accuracy_level == 4:
        kernel = float(np.linalg.norm(int8_blocks(x64, block_size) @ q64 - ref) / ref_norm)
    return plain, weighted, kernel


def weighted_errors(fp32: Model | str | Path, quantized: Model | str | Path,
                    prompts: Sequence[PromptLike] | PromptLike | None = None, *, stats: Sequence[ChannelStats] | None = None,
                    image=None, image_size: int | None = None) -> list[WeightedError]:
    """Plain and activation-weighted error of every MatMulNBits of `quantized` (an INT4 folder or Model) against the
    fp32 weight writing the same output in `fp32` (an export folder or fp32 Model), on the fp32 inputs of the
    calibration prompts. Pass `stats` from `collect_channel_stats` (with samples) to reuse one capture."""
    if stats is None:
        stats = collect_channel_stats(fp32, prompts, image=image, image_size=image_size)
    by_weight = {s.weight: s for s in stats if s.samples is not None}
    ref_file = decoder_file(fp32, "fp32")
    weights = fp32_weights_by_output(ref_file)
    out = []
    for qm in iter_quantized(quantized):
        ref_w = weights.get(qm.output)
        s = by_weight.get(ref_w.name) if ref_w is not None else None
        if s is None:
            continue  # the lm_head (not collected by default), or a MatMul the fp32 graph does not have
        w = np.asarray(map_array(ref_w, ref_file.parent) if ref_w.data_location == onnx.TensorProto.EXTERNAL
                       else read_array(ref_w, ref_file.parent), np.float32)  # (K, N)
        plain, weighted, kernel = output_errors(s.samples, w, qm.dequantize(), accuracy_level=qm.accuracy_level,
                                                block_size=qm.block_size)
        out.append(WeightedError(s.matmul, plain, weighted, kernel, qm.bits, qm.block_size, qm.accuracy_level,
                                 s.outliers))
        del w
    return out


def format_weighted(errors: Sequence[WeightedError]) -> str:
    """The table: plain vs weighted (and accuracy_level 4 kernel) error per MatMul, outlier channels."""
    head = f"{'matmul':30s} {'bits':>4s} {'acc':>3s} {'plain':>7s} {'weighted':>9s} {'kernel':>7s}  outlier channels"
    lines = [head, "-" * len(head)]
    for e in errors:
        kern = "-" if e.kernel is None else f"{e.kernel:7.3f}"
        ch = ", ".join(map(str, e.outliers[:6])) + (" ..." if len(e.outliers) > 6 else "") or "-"
        lines.append(f"{e.matmul[:30]:30s} {e.bits:4d} {e.accuracy_level:3d} {e.plain:7.3f} {e.weighted:9.3f} "
                     f"{kern:>7s}  {ch}")
    return "\n".join(lines)


def format_channel_stats(stats: Sequence[ChannelStats], top: int = 4) -> str:
    """One line per MatMul input: median channel absmax, the largest ratio, the outlier channels."""
    head = f"{'matmul':30s} {'tokens':>6s} {'median':>9s} {'ratio':>9s}  outlier channels (x median)"
    lines = [head, "-" * len(head)]
    for s in stats:
        r = s.channel_ratios()
        ch = ", ".join(f"{k} ({r[k]:.0f}x)" for k in s.outliers[:top]) + (" ..." if len(s.outliers) > top else "")
        lines.append(f"{s.matmul[:30]:30s} {s.tokens:6d} {s.median:9.3g} {s.ratio:9.1f}  {ch or '-'}")
    return "\n".join(lines)


__all__ = ["MAX_ROWS", "OUTLIER_RATIO", "ChannelStats", "WeightedError", "collect_channel_stats", "format_channel_stats",
           "format_weighted", "int8_blocks", "output_errors", "weight_matmuls", "weighted_errors"]
