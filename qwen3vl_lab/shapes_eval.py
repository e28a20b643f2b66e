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

from . import shapes
from .generate import generate_tokens, prepare_multimodal_prompt
from .model import Model
from .vision import VisionFeatures

MAX_NEW_TOKENS = 24  # the longest answer (two objects) is 17 tokens + <|im_end|>


def greedy(logits: np.ndarray, previous_ids: np.ndarray | None = None) -> np.ndarray:
    """The most likely token of each row (B, V) -> (B,)."""
    return np.argmax(logits, axis=-1)


def cached_vision(model: Model):
    """A vision encoder for `prepare_multimodal_prompt` that runs the tower once per distinct image."""
    from .steps import encode_image  # noqa: PLC0415

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
