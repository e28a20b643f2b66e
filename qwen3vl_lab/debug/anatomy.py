"""`qwen3vl-lab inspect`: what an export holds, read from its files and graphs without loading any weights.

    a = describe_export("models/theirs", "int4")
    print(a.render()); a.to_json()
    a.kind, a.io, a.missing, a.quantization, a.embedding, a.lm_head

Layout kind and files (layouts.py), the decoder's inputs and outputs (decoder.DecoderIO, read from the
graph), the precision and the INT4 recipe of every MatMul (bits, block, accuracy_level, symmetric), how
the input embedding is read (an fp32 Gather, or dequantized from the int4 lm_head), the lm_head's
precision, and what the export lacks against ours (3-D positions, DeepStack, a vision graph this
toolkit can run). The graphs are parsed without their external data, so a 4B export inspects in seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from ..decoder import DecoderIO
from ..layout import INPUT_IDS, LOGITS, PIXEL_VALUES, POS_INDICES
from ..layouts import Layout, external_files, find_layout, read_genai_config
from .checkitem import attrs

QUANTIZED_GATHERS = ("GatherBlockQuantized", "DequantizeLinear")


@dataclass
class _Value:
    name: str
    shape: list
    type: str


class GraphSignature:
    """The three InferenceSession methods DecoderIO.read uses, answered from a graph without weights."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        inits = {t.name for t in g.initializer}
        self._inputs = [self._value(v) for v in g.input if v.name not in inits]
        self._optional = [self._value(v) for v in g.input if v.name in inits]
        self._outputs = [self._value(v) for v in g.output]

    @staticmethod
    def _value(v: onnx.ValueInfoProto) -> _Value:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return _Value(v.name, dims, onnx.TensorProto.DataType.Name(t.elem_type).lower())

    def get_inputs(self):
        return self._inputs

    def get_overridable_initializers(self):
        return self._optional

    def get_outputs(self):
        return self._outputs


def _graph(path: Path | None) -> onnx.ModelProto | None:
    return None if path is None else onnx.load(str(path), load_external_data=False)


def quantization(graph: onnx.ModelProto) -> list[dict]:
    """One entry per weight MatMul / MatMulNBits: name, op, bits, block, accuracy_level, symmetric
    (MatMuls of two activations, attention's scores and mix, have no weights and are left out)."""
    out = []
    weights = {t.name for t in graph.graph.initializer}
    for n in graph.graph.node:
        if n.op_type == "MatMulNBits":
            a = attrs(n)
            out.append({"node": n.name, "op": n.op_type, "bits": int(a.get("bits", 4)),
                        "block_size": int(a.get("block_size", 0)), "accuracy_level": int(a.get("accuracy_level", 0)),
                        "symmetric": not (len(n.input) > 3 and bool(n.input[3])), "K": a.get("K"), "N": a.get("N")})
        elif n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights:
            out.append({"node": n.name, "op": n.op_type, "bits": 32})
    return out


def _recipes(entries: list[dict]) -> list[str]:
    counts = Counter(("fp32" if e["op"] != "MatMulNBits" else
                      f"int{e['bits']} block {e['block_size']} accuracy_level {e['accuracy_level']} "
                      f"{'symmetric' if e['symmetric'] else 'asymmetric'}") for e in entries)
    return [f"{n} x {what}" for what, n in counts.most_common()]


def _embedding(layout: Layout, decoder: onnx.ModelProto, embedding: onnx.ModelProto | None) -> str:
    where = embedding or decoder
    quantized = sorted({n.op_type for n in where.graph.node if n.op_type in QUANTIZED_GATHERS})
    if quantized:
        return f"dequantized from a quantized table ({', '.join(quantized)}): the int4 head read back as the embedding"
    if embedding is None:
        token = next((i.name for i in decoder.graph.input if i.name == INPUT_IDS), None)
        return "inside the decoder (fp32)" if token else "none found"
    ops = sorted({n.op_type for n in embedding.graph.node})
    return f"{layout.embedding.name}: {'an fp32 Gather' if ops == ['Gather'] else ', '.join(ops)}"


def _lm_head(decoder: onnx.ModelProto) -> str:
    node = next((n for n in decoder.graph.node if LOGITS in n.output), None)
    if node is None:
        return "not found"
    if node.op_type == "MatMulNBits":
        a = attrs(node)
        return f"MatMulNBits int{a.get('bits', 4)} block {a.get('block_size')} accuracy_level {a.get('accuracy_level', 0)}"
    return f"{node.op_type} (fp32)"


def _vision_usable(vision: onnx.ModelProto | None) -> bool:
    return vision is not None and {i.name for i in vision.graph.input} >= {PIXEL_VALUES, POS_INDICES}


def _missing_weights(layout: Layout, *graphs: onnx.ModelProto | None) -> list[str]:
    """One entry per graph whose external-data files are not there (a location outside the graph's folder
    is refused by `external_files` before anything is opened)."""
    out = []
    for path, graph in zip((layout.decoder, layout.embedding, layout.vision), graphs):
        if graph is not None:
            absent = [f.name for f in external_files(graph, path) if not f.is_file()]
            if absent:
                out.append(f"the weights of {path.name} ({', '.join(absent)}: not in {path.parent})")
    return out


@dataclass
class ExportAnatomy:
    path: str
    kind: str
    precision: str
    precisions: list[str]
    files: dict[str, str | None]
    sizes_mb: dict[str, float]
    model_type: str | None
    io: dict
    missing: list[str]
    quantization: list[str]
    matmuls: list[dict] = field(repr=False)
    embedding: str = ""
    lm_head: str = ""
    tokenizer: str = ""
    checkpoint: str | None = None
    notices: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        lines = [f"{self.path}: a {self.kind} export, {self.precision} (precisions here: {', '.join(self.precisions)})"]
        lines += [f"  {part:10s} {name or '-'}" + (f"  ({self.sizes_mb[part]:.1f} MB)" if part in self.sizes_mb else "")
                  for part, name in self.files.items()]
        lines.append(f"  model.type {self.model_type!r}" if self.model_type else "  no genai_config.json")
        io = self.io
        lines.append(f"  decoder takes {io['token_input']}; positions {io['positions']}; "
                     f"DeepStack {'yes' if io['deepstack'] else 'no'}; {io['num_layers']} layers, KV "
                     f"{io['past'][0][0]} -> {io['present'][0][0]}; logits_to_keep {io['logits_to_keep'] or 'no'}; "
                     f"attention outputs {'yes' if io['attentions'] else 'no'}")
        lines.append("  MatMuls: " + "; ".join(self.quantization))
        lines.append(f"  input embedding: {self.embedding}")
        lines.append(f"  lm_head: {self.lm_head}")
        lines.append(f"  tokenizer: {self.tokenizer}")
        lines.append(f"  checkpoint: {self.checkpoint or 'not shipped'}")
        lines.append("  missing: " + ("; ".join(self.missing) if self.missing else "nothing (3-D positions, DeepStack, vision)"))
        lines += [f"  note: {n}" for n in self.notices]
        return "\n".join(lines)


def describe_export(path: str | Path, precision: str | None = None, *, tokenizer_dir=None) -> ExportAnatomy:
    layout = find_layout(path, precision, tokenizer_dir=tokenizer_dir)
    decoder = _graph(layout.decoder)
    embedding = _graph(layout.embedding)
    vision = _graph(layout.vision)
    io = DecoderIO.read(GraphSignature(decoder))
    missing = _missing_weights(layout, decoder, embedding, vision) + list(io.missing)
    if not _vision_usable(vision):
        missing.append("a vision graph this toolkit can run" + (f" ({layout.vision.name} takes other inputs)"
                                                                 if layout.vision else " (none in the export)"))
    files = {"decoder": layout.decoder, "embedding": layout.embedding, "vision": layout.vision,
             "config": layout.genai_config}
    sizes = {}
    for part, f in files.items():
        if f is not None and f.suffix == ".onnx":
            sizes[part] = sum(p.stat().st_size for p in f.parent.glob(f.name + "*")) / 1e6  # graph + external data
    entries = quantization(decoder)
    info = read_genai_config(layout.genai_config) if layout.genai_config else None
    return ExportAnatomy(
        path=str(path), kind=layout.kind, precision=layout.precision, precisions=list(layout.precisions),
        files={k: (str(v) if v is not None else None) for k, v in files.items()}, sizes_mb=sizes,
        model_type=info.type if info else None, io={**asdict(io), "num_layers": io.num_layers}, missing=missing, quantization=_recipes(entries),
        matmuls=entries, embedding=_embedding(layout, decoder, embedding), lm_head=_lm_head(decoder),
        tokenizer=str(layout.tokenizer_dir) if layout.tokenizer_dir else "the package's copy",
        checkpoint=str(layout.hf_dir) if layout.hf_dir else None, notices=list(layout.notices))


def to_json_line(anatomy: ExportAnatomy) -> str:
    return json.dumps(anatomy.to_json(), ensure_ascii=False)


__all__ = ["ExportAnatomy", "GraphSignature", "describe_export", "quantization", "to_json_line"]
