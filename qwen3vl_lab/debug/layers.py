"""Layer by layer: where inside the decoder does the INT4 error appear and grow?

    report = compare_layers(ref, test, "Write a haiku about the sea.")
    print(report.table())
    report.layers, report.series("hidden", "sqnr_db")      # (L,) arrays to plot
    report.growth()                                         # layer whose residual stream gets worse fastest

onnxruntime's `qdq_loss_debug` matches tensors around QuantizeLinear/DequantizeLinear nodes and finds
nothing in weight-only MatMulNBits models (ONNX_ANCHORS.md §4). Here both decoders get the same
named tensors as extra graph outputs — the export names them `layers.{i}.attn_out` (attention
output, before the residual add), `layers.{i}.mlp_out`, `layers.{i}.hidden` (residual stream after
layer i, DeepStack included) and `final_norm` — and the two captures are matched by name.

The tapped copy is the graph only: the .onnx is parsed without its weights, outputs are added in
memory, and onnxruntime reads the weights from the original folder's external-data files
(`session.model_external_initializers_file_folder_path`). Nothing is copied or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from ..cache import KVCache
from ..errors import UserError
from ..generate import Prompt
from ..layout import DECODER_FILE
from ..model import Model
from ..positions import next_positions
from ..steps import embed, zeros_deepstack
from .inputs import PromptLike, as_model, as_specs, label_of, prepare, session_options_for
from .record import release

KINDS = ("attn_out", "mlp_out", "hidden")


def tap_names(model: Model) -> list[str]:
    """The per-layer tensors (attn_out, mlp_out, hidden for each layer), then final_norm and logits."""
    n = model.config.text.num_hidden_layers
    return [f"layers.{i}.{k}" for i in range(n) for k in KINDS] + ["final_norm", "logits"]


def load_graph(model: Model) -> onnx.ModelProto:
    """The decoder graph without its weights (initializers still point at the external-data file)."""
    return onnx.load(str(model.folder / DECODER_FILE), load_external_data=False)


def graph_session(model: Model, graph: onnx.ModelProto) -> ort.InferenceSession:
    """A session for an edited copy of `model`'s decoder graph; weights come from the model's own folder."""
    so = session_options_for(model, graph)  # an fp32 graph's weights stay memory-mapped (inputs.py)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model.folder))
    return ort.InferenceSession(graph.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def accuracy_level_session(model: Model, level: int = 0) -> ort.InferenceSession:
    """The decoder with every MatMulNBits' accuracy_level rewritten to `level`, same weights, nothing written
    (the oracle of ONNX_ANCHORS.md §2.6: does level 4's int8 activation quantization cause the drift?)."""
    from ..export.quantize import set_accuracy_level  # noqa: PLC0415

    graph = load_graph(model)
    for n in graph.graph.node:
        if n.op_type == "MatMulNBits":
            set_accuracy_level(n, level)
    return graph_session(model, graph)


def tapped_session(model: Model, names: Sequence[str]) -> tuple[ort.InferenceSession, list[str]]:
    """The decoder with `names` (those that exist in the graph) added as outputs -> (session, names found)."""
    graph = load_graph(model)
    produced = {o for n in graph.graph.node for o in n.output}
    existing = {o.name for o in graph.graph.output}
    found = [n for n in names if n in produced or n in existing]
    for name in found:
        if name not in existing:
            graph.graph.output.append(onnx.ValueInfoProto(name=name))  # type/shape left to onnxruntime
    return graph_session(model, graph), found


def extend_prompt(model: Model, prompt: Prompt, tokens: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Prompt + teacher-forced continuation as ONE prefill: embeddings (1, S+T, H), positions (3, 1, S+T), DeepStack."""
    embeds, positions, deepstack = prompt.inputs_embeds, prompt.positions.position_ids, prompt.deepstack
    if tokens is None or len(tokens) == 0:
        return embeds, positions, deepstack
    ids = np.asarray(tokens, np.int64).reshape(1, -1)  # (1, T)
    n = ids.shape[1]
    mask = np.ones((1, prompt.length + n), np.int64)
    more = next_positions(mask, prompt.positions.rope_deltas, n)  # (3, 1, T): cache_len + k + delta
    embeds = np.concatenate([embeds, embed(model, ids)], axis=1)
    positions = np.concatenate([positions, more], axis=2)
    if deepstack is not None:
        deepstack = np.concatenate([deepstack, np.zeros((*deepstack.shape[:2], n, deepstack.shape[3]), np.float32)], axis=2)
    return embeds, positions, deepstack


def decoder_feeds(model: Model, session: ort.InferenceSession, embeds: np.ndarray, position_ids: np.ndarray,
                  deepstack: np.ndarray | None) -> dict[str, np.ndarray]:
    """Inputs of one full-sequence prefill with an empty cache (all positions' logits kept)."""
    B, S, _ = embeds.shape
    inputs = {i.name for i in session.get_inputs()}
    feeds = {"inputs_embeds": embeds.astype(np.float32, copy=False), "position_ids": position_ids.astype(np.int64),
             "attention_mask": np.ones((B, S), np.int64), **KVCache.empty(model.config.text, B).feeds()}
    if "deepstack_embeds" in inputs:
        feeds["deepstack_embeds"] = deepstack if deepstack is not None else zeros_deepstack(model, B, S)
    if "logits_to_keep" in inputs:
        feeds["logits_to_keep"] = np.array(0, np.int64)
    return {k: v for k, v in feeds.items() if k in inputs}


def capture(model: Model | str, prompt: PromptLike, names: Sequence[str] | None = None,
            tokens: Sequence[int] | None = None, *, session=None) -> dict[str, np.ndarray]:
    """Run one prefill over the prompt (+ `tokens`, teacher-forced) and return the named tensors."""
    model = as_model(model)
    names = tap_names(model) if names is None else list(names)
    if session is None:
        session, names = tapped_session(model, names)
    p = prepare(model, as_specs(prompt)[0])
    embeds, positions, deepstack = extend_prompt(model, p, tokens)
    out = session.run(names, decoder_feeds(model, session, embeds, positions, deepstack))
    return dict(zip(names, out))


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
    specs = matmul_inputs(load_graph(model))
    tensors = list(dict.fromkeys(s[1] for s in specs))
    got = capture(model, prompt, tensors)
    return [ActivationStats(node, t, w, acc, bs, channel_ratio(got[t]), int8_zeroed(got[t], bs))
            for node, t, w, acc, bs in specs if t in got]


__all__ = ["ActivationStats", "Capture", "KINDS", "LayerReport", "TensorError", "accuracy_level_session", "activation_stats", "capture",
           "capture_prompt", "compare_captures", "compare_layers", "cosine", "graph_session", "int8_zeroed", "load_graph",
           "relative_error", "sqnr_db", "tap_names", "tapped_session"]
