"""Layer by layer: where inside the decoder does the INT4 error appear and grow?

    report = compare_layers(ref, test, "Write a haiku about the sea.")
    print(report.table())
    report.layers, report.series("hidden", "sqnr_db")      # (L,) arrays to plot
    report.growth()                                         # layer whose residual stream gets worse fastest

onnxruntime's `qdq_loss_debug` matches tensors around QuantizeLinear/DequantizeLinear nodes and finds
nothing in weight-only MatMulNBits models. Here both decoders are read through the runtime's hook
points (`taps.run_with_cache`: `layers.{i}.attn_out`, `layers.{i}.mlp_out`, `layers.{i}.hidden`,
`final_norm`, added as outputs of an in-memory copy of each graph; nothing is copied or written) and
the two captures are matched by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx

from ..decoder import OnnxDecoder
from ..errors import UserError
from ..export.quantize import set_accuracy_level
from ..model import Model, edited_session
from ..taps import KINDS, TappedDecoder, hook_points, run_with_cache
from .inputs import PromptLike, as_model, as_specs, label_of, prepare
from .record import release


def tap_names(model: Model) -> list[str]:
    """The per-layer tensors (attn_out, mlp_out, hidden for each layer), then final_norm and logits."""
    return [*hook_points(model), "logits"]


def accuracy_level_decoder(model: Model, level: int = 0) -> OnnxDecoder:
    """The decoder with every MatMulNBits' accuracy_level rewritten to `level`, same weights, nothing written
    (the oracle for "is it accuracy_level 4's int8 activation quantization that drifts?")."""
    graph = model.graph()
    for n in graph.graph.node:
        if n.op_type == "MatMulNBits":
            set_accuracy_level(n, level)
    return OnnxDecoder(edited_session(model, graph), model.config.text, model.embed, accept_missing=True)


def capture(model: Model | str, prompt: PromptLike, names: Sequence[str] | None = None,
            tokens: Sequence[int] | None = None, *, decoder: TappedDecoder | None = None) -> dict[str, np.ndarray]:
    """Run one prefill over the prompt (+ `tokens`, teacher-forced) and return the named tensors
    (`taps.run_with_cache`; "logits" is every position's logits)."""
    model = as_model(model)
    names = tap_names(model) if names is None else list(names)
    logits, cache = run_with_cache(model, prepare(model, as_specs(prompt)[0]), [n for n in names if n != "logits"],
                                   tokens, decoder=decoder)
    return {**cache, **({"logits": logits} if "logits" in names else {})}


# -- error measures ------------------------------------------------------------------------------
def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - test|^2): signal to quantization noise, dB (inf when identical)."""
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    noise = float(((ref - test) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def relative_error(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = np.asarray(ref, np.float64), np.asarray(test, np.float64)
    norm = np.linalg.norm(ref)
    return float(np.linalg.norm(ref - test) / norm) if norm > 0 else float(np.linalg.norm(test) > 0)


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    a, b = np.asarray(ref, np.float64).ravel(), np.asarray(test, np.float64).ravel()
    d = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / d) if d > 0 else 1.0


def _parse(name: str) -> tuple[int | None, str]:
    if name.startswith("layers."):
        _, i, kind = name.split(".", 2)
        return int(i), kind
    return None, name


@dataclass
class TensorError:
    name: str
    layer: int | None  # None for final_norm / logits
    kind: str  # attn_out, mlp_out, hidden, final_norm, logits
    rel_error: float
    sqnr_db: float
    max_abs: float
    cosine: float


@dataclass
class LayerReport:
    """Reference vs test, tensor by tensor (all positions of the prompt)."""

    label: str
    num_layers: int
    rows: list[TensorError]

    @property
    def layers(self) -> np.ndarray:
        return np.arange(self.num_layers)

    def series(self, kind: str = "hidden", metric: str = "sqnr_db") -> np.ndarray:
        """(L,) one value per layer for `kind` (attn_out / mlp_out / hidden); NaN where not captured."""
        out = np.full(self.num_layers, np.nan)
        for r in self.rows:
            if r.kind == kind and r.layer is not None:
                out[r.layer] = getattr(r, metric)
        return out

    def row(self, name: str) -> TensorError | None:
        return next((r for r in self.rows if r.name == name), None)

    def growth(self) -> tuple[int | None, float]:
        """(layer, increase) where the residual stream's relative error grows the most (layer 0: from 0)."""
        err = self.series("hidden", "rel_error")
        if np.isnan(err).all():
            return None, 0.0
        steps = np.diff(np.concatenate([[0.0], np.nan_to_num(err)]))
        i = int(np.argmax(steps))
        return i, float(steps[i])

    def table(self) -> str:
        head = f"{'layer':>5s} " + " ".join(f"{k + ' SQNR dB':>16s}" for k in KINDS) + f" {'hidden rel err':>15s}"
        lines = [f"layer errors, {self.label}", head, "-" * len(head)]
        for i in range(self.num_layers):
            vals = " ".join(f"{self.series(k)[i]:16.1f}" for k in KINDS)
            lines.append(f"{i:5d} {vals} {self.series('hidden', 'rel_error')[i]:15.4f}")
        for name in ("final_norm", "logits"):
            r = self.row(name)
            if r is not None:
                lines.append(f"{name:>10s}: SQNR {r.sqnr_db:.1f} dB, rel err {r.rel_error:.4f}, max |diff| {r.max_abs:.4g}")
        layer, inc = self.growth()
        if layer is not None and inc > 0:
            lines.append(f"largest growth of the residual-stream error: layer {layer} (+{inc:.4f} relative error)")
        return "\n".join(lines)


def compare_captures(ref: dict[str, np.ndarray], test: dict[str, np.ndarray], num_layers: int,
                     label: str = "") -> LayerReport:
    rows = []
    for name in ref:
        if name not in test:
            continue
        a, b = ref[name], test[name]
        layer, kind = _parse(name)
        rows.append(TensorError(name, layer, kind, relative_error(a, b), sqnr_db(a, b),
                                float(np.abs(np.asarray(a, np.float64) - b).max()), cosine(a, b)))
    return LayerReport(label, num_layers, rows)


@dataclass
class Capture:
    """One model's named tensors on one prompt, kept after the model is released."""

    input_ids: np.ndarray  # (1, S) the prompt's ids (both sides must tokenize alike)
    tensors: dict[str, np.ndarray]  # name -> (1, S(+T), H) etc.
    num_layers: int


def capture_prompt(model: Model | str, prompt: PromptLike, names: Sequence[str] | None = None,
                   tokens: Sequence[int] | None = None) -> Capture:
    """`capture` on one prompt. A folder is loaded without its plain decoder session (the tapped copy is
    the only decoder in memory) and released before this returns."""
    owned = not isinstance(model, Model)
    m = as_model(model, open_decoder=False)
    try:
        p = prepare(m, as_specs(prompt)[0])
        tensors = capture(m, p, tap_names(m) if names is None else names, tokens)
        return Capture(np.asarray(p.input_ids), tensors, m.config.text.num_hidden_layers)
    finally:
        if owned:
            release(m)


def compare_layers(ref: Model | str | Capture, test: Model | str, prompt: PromptLike = "Write a haiku about the sea.",
                   tokens: Sequence[int] | None = None, names: Sequence[str] | None = None) -> LayerReport:
    """Capture the same named tensors in both decoders on the same inputs and measure the error of each.

    One at a time: the reference's tensors are captured (and a reference folder released) before the
    test model runs; `ref` may also be a `Capture` made earlier with `capture_prompt`."""
    spec = as_specs(prompt)[0]
    a = ref if isinstance(ref, Capture) else capture_prompt(ref, spec, names, tokens)
    b = capture_prompt(test, spec, list(a.tensors), tokens)
    if a.input_ids.shape != b.input_ids.shape or not np.array_equal(a.input_ids, b.input_ids):
        raise UserError("the two models turn the prompt into different token ids (different tokenizers or image "
                        "settings); compare folders exported from the same checkpoint")
    return compare_captures(a.tensors, b.tensors, a.num_layers, label_of(spec))


# -- activations entering the quantized MatMuls (the accuracy_level 4 question) -------------------
@dataclass
class ActivationStats:
    """The input of one MatMul / MatMulNBits: how outlier-heavy it is (accuracy_level 4 quantizes it to int8)."""

    node: str
    tensor: str
    weight: str
    accuracy_level: int
    block_size: int
    channel_ratio: float  # max over channels of max|x| / median over channels of max|x| (massive activations)
    int8_zeroed: float  # fraction of values that per-block int8 quantization (scale absmax/127) rounds to 0


def int8_zeroed(x: np.ndarray, block_size: int) -> float:
    """Fraction of the non-zero values of x (..., K) that symmetric per-block int8 quantization along K
    (scale = block absmax / 127, what accuracy_level 4 does) rounds to zero: an outlier crushes its block."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])  # (rows, K)
    pad = (-x.shape[1]) % block_size
    xp = np.pad(x, ((0, 0), (0, pad))).reshape(x.shape[0], -1, block_size)  # (rows, blocks, bs)
    scale = np.abs(xp).max(axis=-1, keepdims=True) / 127.0
    nonzero = xp != 0
    zeroed = nonzero & (np.abs(xp) < 0.5 * scale)
    return float(zeroed.sum() / max(nonzero.sum(), 1))


def channel_ratio(x: np.ndarray) -> float:
    m = np.abs(np.asarray(x, np.float64)).reshape(-1, x.shape[-1]).max(axis=0)  # (K,) per input channel
    med = float(np.median(m))
    return float(m.max() / med) if med > 0 else float("inf")


def matmul_inputs(graph: onnx.ModelProto) -> list[tuple[str, str, str, int, int]]:
    """(node, activation input, weight, accuracy_level, block_size) of every MatMulNBits (and weight MatMul)."""
    inits = {t.name for t in graph.graph.initializer}
    out = []
    for n in graph.graph.node:
        if n.op_type == "MatMulNBits" or (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            out.append((n.name, n.input[0], n.input[1], int(attrs.get("accuracy_level", 0)),
                        int(attrs.get("block_size", 32))))
    return out


def activation_stats(model: Model | str, prompt: PromptLike = "Write a haiku about the sea.") -> list[ActivationStats]:
    """Outlier measures of every quantized MatMul's input on one prompt."""
    model = as_model(model)
    specs = matmul_inputs(model.graph())
    tensors = list(dict.fromkeys(s[1] for s in specs))
    got = capture(model, prompt, tensors)
    return [ActivationStats(node, t, w, acc, bs, channel_ratio(got[t]), int8_zeroed(got[t], bs))
            for node, t, w, acc, bs in specs if t in got]


__all__ = ["ActivationStats", "KINDS", "LayerReport", "TensorError", "accuracy_level_decoder", "activation_stats", "capture",
           "compare_captures", "compare_layers", "cosine", "int8_zeroed", "relative_error", "sqnr_db", "tap_names"]
