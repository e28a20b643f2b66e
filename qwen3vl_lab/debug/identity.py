"""Is the reference the same model as the one tested? Checked before anything is blamed on quantization.

    check_same_dims(ref.config, test.config, "--reference OUT-B", "--model_dir OUT-A")   # one line when not
    not_the_same_model(embedding_table(test.layout), checkpoint_table(CKPT), "--hf_dir CKPT")   # a sentence, or None

Two exports of different models fail in onnxruntime (InvalidArgument on deepstack_embeds, a KV cache of
another width) unless their dimensions are checked first: `check_same_dims` names the numbers that differ.
Two models of the same dimensions run fine and simply disagree, which looks exactly like a broken INT4
recipe; their weights tell them apart, but not the quantized ones (a packing bug makes an INT4 matrix as
unlike its fp32 source as another model's). The token-embedding table is compared instead: our exports and
the guide's keep it in float32 in the embedding graph, untouched by any quantizer, so the same model's
tables are equal and another model's differ by about sqrt(2) = 1.4 of their norm. Where the tested export
has no float32 table (its embedding inside a quantized decoder), nothing is claimed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..config import ModelConfig
from ..errors import UserError
from ..export.checkpoint import Checkpoint
from ..layouts import Layout
from .weights import map_array

EMBED_NAMES = ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight")
SAMPLE_ROWS = 4096  # token rows compared: enough to tell two models apart, a few MB even at 4B
# The dimensions every layout states (a foreign export without a checkpoint has them from its graph; its MLP width
# is not in its genai_config.json, so intermediate_size is not compared: the embedding tables below tell models apart).
DIMS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim")
NOT_SAME_MODEL = 0.5  # |E_ref - E_test| / |E_ref| of two float32 embedding tables: 0 for the same model, ~1.4 for another


def check_same_dims(ref: ModelConfig, test: ModelConfig, ref_name: str, test_name: str) -> None:
    """One line naming the dimensions that differ, when `ref` and `test` cannot be the same model."""
    differ = [f"{k} {getattr(ref.text, k)} vs {getattr(test.text, k)}" for k in DIMS
              if getattr(ref.text, k) != getattr(test.text, k)]
    if ref.num_deepstack != test.num_deepstack and ref.num_deepstack and test.num_deepstack:
        differ.append(f"deepstack levels {ref.num_deepstack} vs {test.num_deepstack}")
    if differ:
        raise UserError(f"{ref_name} and {test_name} are not the same model ({', '.join(differ)}); compare a model "
                        "with the fp32 export (or checkpoint) it was made from")


def embedding_table(layout: Layout | None) -> np.ndarray | None:
    """The (vocab, hidden) float32 token-embedding table of an export's embedding graph (memory-mapped), or None
    when the export has none in float32 (the embedding inside a quantized decoder, a GatherBlockQuantized)."""
    if layout is None or layout.embedding is None:
        return None
    graph = onnx.load(str(layout.embedding), load_external_data=False)
    tables = [t for t in graph.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT]
    if not tables:
        return None
    return map_array(max(tables, key=lambda t: t.dims[0] * t.dims[1]), layout.embedding.parent)


def checkpoint_table(hf_dir: str | Path) -> np.ndarray | None:
    """The checkpoint's embed_tokens (vocab, hidden) as float32, or None when it has none under a known name."""
    ckpt = Checkpoint.open(hf_dir)
    name = next((n for n in EMBED_NAMES if n in set(ckpt.names())), None)
    return ckpt.get(name) if name else None


def not_the_same_model(test: np.ndarray | None, reference: np.ndarray | None, source: str) -> str | None:
    """A sentence for the report when the tested model's float32 embedding table is not the reference's (`source`),
    else None (also when either table is missing or they differ in shape: then nothing is claimed)."""
    if test is None or reference is None or test.shape != reference.shape:
        return None
    rows = slice(0, min(SAMPLE_ROWS, test.shape[0]))
    a, b = np.asarray(test[rows], np.float64), np.asarray(reference[rows], np.float64)
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    if not rel > NOT_SAME_MODEL:
        return None
    return (f"{source} is not the model that was tested: their token-embedding tables, which no quantizer touches in "
            f"these exports, differ by {rel:.0%} of their norm (the same model: 0 %); the figures in this report "
            "compare two different models, not quantization. Pass the fp32 export or checkpoint the tested model "
            "was made from")


__all__ = ["NOT_SAME_MODEL", "check_same_dims", "checkpoint_table", "embedding_table", "not_the_same_model"]
