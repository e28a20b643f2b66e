"""Is the reference the same model as the one tested? Checked before anything is blamed on quantization.

    check_same_dims(ref.config, test.config, "--reference OUT-B", "--model_dir OUT-A")   # one line when not
    not_the_same_model(weight_report, "the fp32 weights of --hf_dir CKPT")                 # a sentence, or None

Two exports of different models fail in onnxruntime (InvalidArgument on deepstack_embeds, a KV cache of
another width) unless their dimensions are checked first: `check_same_dims` names the numbers that differ.
Two models of the same dimensions run fine and simply disagree, which looks exactly like a broken INT4
recipe; their weights tell them apart. Quantizing a weight matrix to b bits moves it by a fraction of its
norm (INT4 round-to-nearest in blocks of 32: about 0.1; 2 bits: about 0.5), while two independently
trained (or initialised) matrices of the same scale differ by about sqrt(2) = 1.4 of it. A median relative
error above NOT_SAME_MODEL (0.9) over all quantized matrices is therefore another model, not quantization.
"""

from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..errors import UserError

DIMS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "intermediate_size")
NOT_SAME_MODEL = 0.9  # median |W_ref - W_test| / |W_ref| beyond any quantization (2 bits: ~0.5; another model: ~1.4)


def check_same_dims(ref: ModelConfig, test: ModelConfig, ref_name: str, test_name: str) -> None:
    """One line naming the dimensions that differ, when `ref` and `test` cannot be the same model."""
    differ = [f"{k} {getattr(ref.text, k)} vs {getattr(test.text, k)}" for k in DIMS
              if getattr(ref.text, k) != getattr(test.text, k)]
    if ref.num_deepstack != test.num_deepstack and ref.num_deepstack and test.num_deepstack:
        differ.append(f"deepstack levels {ref.num_deepstack} vs {test.num_deepstack}")
    if differ:
        raise UserError(f"{ref_name} and {test_name} are not the same model ({', '.join(differ)}); compare a model "
                        "with the fp32 export (or checkpoint) it was made from")


def not_the_same_model(weights, source: str) -> str | None:
    """A sentence for the report when the fp32 weights (`source`) are another model's than the quantized ones
    (`weights`: a WeightReport), else None."""
    if weights is None or not len(weights.rows):
        return None
    median = float(np.median(weights.rel_error))
    if not median > NOT_SAME_MODEL:
        return None
    return (f"{source} is not the model the tested weights were made from: its weight matrices differ from the "
            f"tested ones by a median {median:.0%} of their norm, far beyond any quantization error (INT4: about "
            "10 %); the figures in this report compare two different models, not quantization. Pass the fp32 export or "
            "checkpoint the tested model was made from")


__all__ = ["NOT_SAME_MODEL", "check_same_dims", "not_the_same_model"]
