"""`qwen3vl-lab eval-shapes`: exact-match accuracy of an exported model on held-out shapes scenes.

Runs our ONNX pipeline only (no torch, no export): for each fresh scene (`shapes.heldout_set`) the
vision tower runs once, then every question of the scene goes through the chat template, prefill
and greedy decode steps (`generate.prepare_multimodal_prompt` + `generate.generate_tokens`).

    model = load_model("models/shapes-onnx", "fp32")
    result = evaluate_shapes(model, n=200)
    print(format_table(result.table))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..generate import generate_step, generate_tokens, prepare_multimodal_prompt
from ..model import Model
from ..sampling import forced, greedy
from ..steps import encode_image
from ..vision import VisionFeatures
from . import task as shapes

MAX_NEW_TOKENS = 24  # the longest answer (two objects) is 17 tokens + <|im_end|>


def cached_vision(model: Model):
    """A vision encoder for `prepare_multimodal_prompt` that runs the tower once per distinct image."""
    cache: dict[bytes, VisionFeatures] = {}

    def encode(pixel_rows: np.ndarray, grid: np.ndarray) -> VisionFeatures:
        key = np.ascontiguousarray(pixel_rows).tobytes() + np.asarray(grid).tobytes()
        if key not in cache:
            cache[key] = encode_image(model, pixel_rows, grid)
        return cache[key]

    return encode


def answer(model: Model, image, question: str, encoder=None, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """One question about one image, greedy, through the ONNX pipeline -> the answer text."""
    prompt = prepare_multimodal_prompt(model, question, images=[image], encoder=encoder)
    tokens = list(generate_tokens(model, prompt, greedy, max_new_tokens))
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


@dataclass
class ShapesEval:
    table: dict  # per question type, per object count, "all": {"correct", "total", "accuracy"}
    questions: list = field(default_factory=list)  # shapes.QA, in order
    predictions: list[str] = field(default_factory=list)
    n_objects: list[int] = field(default_factory=list)


def evaluate_shapes(model: Model, n: int = 200, seed: int = 0, progress: bool = True) -> ShapesEval:
    """Every question of held-out scenes 0..n-1 (one and two objects alternate) -> ShapesEval."""
    qas, predictions, counts = [], [], []
    for image, objects in tqdm(shapes.heldout_set(n, seed), desc="eval-shapes", unit="scene", disable=not progress):
        encoder = cached_vision(model)
        for qa in shapes.question_answer_pairs(objects):
            qas.append(qa)
            predictions.append(answer(model, image, qa.question, encoder))
            counts.append(len(objects))
    return ShapesEval(shapes.accuracy_table(qas, predictions, counts), qas, predictions, counts)


# ------------------------------------------------------------------------------------- attention
@dataclass
class KeywordAttention:
    """Where the model looks when it predicts the answer's key word ("red", "circle").

    image_attention (L, heads, 9): attention probability on each image token (= cell, reading order)
    from the position whose logits predict the key word; `object_cell` is the asked-about object's cell.
    """

    qa: shapes.QA
    keyword_token: str
    image_attention: np.ndarray  # (L, heads, 9)
    object_cell: int

    def object_share(self) -> np.ndarray:
        """(L, heads): the share of each head's image attention that falls on the object's cell."""
        total = self.image_attention.sum(-1)  # (L, heads)
        return self.image_attention[..., self.object_cell] / np.maximum(total, 1e-12)

    def layer_share(self) -> np.ndarray:
        """(L,): the same share with each layer's heads averaged first."""
        per_cell = self.image_attention.mean(1)  # (L, 9)
        return per_cell[:, self.object_cell] / np.maximum(per_cell.sum(-1), 1e-12)


def keyword_index(tokenizer, answer_ids: list[int], word: str) -> int:
    """Index of the answer token that spells `word` (e.g. ' circle' in 'A circle.', 'Red' in 'Red.')."""
    for k, t in enumerate(answer_ids):
        if tokenizer.decode([t]).strip().lower() == word:
            return k
    raise UserError(f"the answer has no single token {word!r}; pass a colour or shape question")


def keyword_attention(model: Model, image, qa: shapes.QA) -> KeywordAttention:
    """Teacher-force the expected answer up to its key word and read the decoder's attention there.

    Needs an export with attention outputs (`qwen3vl-lab export --with_attentions`); colour and shape
    questions (their key word is one token).
    """
    if qa.kind not in ("colour", "shape"):
        raise UserError(f"keyword_attention takes colour or shape questions, not {qa.kind!r}")
    prompt = prepare_multimodal_prompt(model, qa.question, images=[image])
    answer_ids = list(model.tokenizer(qa.answer)["input_ids"])
    k = keyword_index(model.tokenizer, answer_ids, qa.word)
    *_, last = generate_step(model, prompt, forced(answer_ids[:k]), k + 1, eos_token_ids=[])  # feed the answer up to
    step = last.step  # the key word: this step's logits predict it
    if step.attentions is None:
        raise UserError(f"{model.folder} has no attention outputs; re-export with `qwen3vl-lab export --with_attentions`")
    image_cols = np.flatnonzero(prompt.input_ids[0] == model.config.image_token_id)  # (9,)
    att = np.stack([a[0, :, -1][:, image_cols] for a in step.attentions])  # (L, heads, 9)
    cell = qa.cells[0]
    return KeywordAttention(qa, model.tokenizer.decode([answer_ids[k]]), att, cell)
