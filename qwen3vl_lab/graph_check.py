"""An exported folder checked against its own graphs: genai_config.json's numbers must be the ones the
ONNX files were built with, or onnxruntime fails mid-generation with a shape error (or, for a wrong
vocab_size, the tokenizer decodes garbage).

    check_graph(session, path, config, "decoder")   # when a session opens (model.py)

Each check reads the static dimensions of the graph's inputs and outputs (names from layout.py) and names
the first number that disagrees; a decoder's layers, KV heads, head size and hidden size are compared by
`decoder.DecoderIO.check_config`, the one place any decoder is checked against a config.
"""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .decoder import DecoderIO
from .errors import UserError
from .layout import DEEPSTACK_FEATURES, IMAGE_FEATURES, OWN_CONFIG, PIXEL_VALUES, ROTARY_COS

REEXPORT = "the config was edited or comes from another export: re-run `qwen3vl-lab export` for this folder"


def _dims(session) -> dict[str, list]:
    """name -> shape (ints for static dimensions, strings or None for symbolic ones) of every input and output."""
    return {v.name: list(v.shape) for v in [*session.get_inputs(), *session.get_outputs()]}


def _expect(dims: dict[str, list], name: str, axis: int, value: int, what: str, path: Path) -> None:
    shape = dims.get(name)
    if shape is None or not -len(shape) <= axis < len(shape) or not isinstance(shape[axis], int):
        return  # symbolic or absent: nothing to compare
    if shape[axis] != value:
        raise UserError(f"{path.parent / OWN_CONFIG} says {what} = {value} but {path.name} was built with "
                        f"{shape[axis]} ({name} {shape}); {REEXPORT}")


def check_graph(session, path: Path, config: ModelConfig, kind: str) -> None:
    """kind: "embedding", "decoder" (model.onnx or model-fast.onnx) or "vision"."""
    dims, text, vis = _dims(session), config.text, config.vision
    if kind == "embedding":
        _expect(dims, "inputs_embeds", -1, text.hidden_size, "text hidden_size", path)
    elif kind == "decoder":
        _expect(dims, "logits", -1, text.vocab_size, "vocab_size", path)
        DecoderIO.read(session).check_config(text, path.name, config=str(path.parent / OWN_CONFIG), fix=REEXPORT)
    elif kind == "vision":
        _expect(dims, PIXEL_VALUES, -1, vis.patch_dim, "the vision patch size (channels x temporal x patch^2)", path)
        _expect(dims, ROTARY_COS, -1, vis.head_dim, "the vision head_dim (hidden_size / num_heads)", path)
        _expect(dims, IMAGE_FEATURES, -1, vis.out_hidden_size, "vision out_hidden_size", path)
        _expect(dims, DEEPSTACK_FEATURES, 0, len(vis.deepstack_visual_indexes), "the number of DeepStack layers", path)
