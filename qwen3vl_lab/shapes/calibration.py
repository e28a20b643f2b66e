"""Calibration prompts and a held-out scorer for `repair` (debug/repair.py) and the doctor on the shapes model.

    prompts = calibration_prompts(6)                # PromptSpec: a question + a scene image, and one text prompt
    scorer = heldout_scorer(20)                     # folder -> {"correct", "total", "predictions"}
    report = repair("OUT", "FIXED", prompts, scorer=scorer)

Calibration scenes come from their own seed stream (`CALIBRATION_STREAM`), which neither training
(`task.TRAIN_STREAM`) nor the held-out scenes (`task.HELDOUT_STREAM`) draw from: a repair tuned on the
calibration prompts is scored on scenes it never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..debug.inputs import PromptSpec, open_model
from ..debug.record import release
from ..errors import UserError
from . import task as shapes
from .evaluate import evaluate_shapes

CALIBRATION_STREAM = 2_000_003  # calibration scenes: [CALIBRATION_STREAM, seed, i]
TEXT_PROMPT = "What shapes and colours can you name?"


def calibration_scene(i: int, seed: int = 0):
    return shapes.make_scene(np.random.default_rng([CALIBRATION_STREAM, seed, i]), n_objects=1 + i % 2)


def calibration_prompts(n_scenes: int = 6, seed: int = 0, *, text: bool = True) -> list[PromptSpec]:
    """Two questions about each of n_scenes calibration scenes (question types in turn), and one text-only prompt."""
    if n_scenes < 1:
        raise UserError(f"calibration needs at least one scene, got {n_scenes}")
    out = []
    for i in range(n_scenes):
        image, objects = calibration_scene(i, seed)
        qas = shapes.question_answer_pairs(objects)
        for j in (i % len(qas), (i + 1) % len(qas)):
            out.append(PromptSpec(qas[j].question, image))
    return out + ([PromptSpec(TEXT_PROMPT)] if text else [])


def heldout_scorer(n: int = 20, seed: int = 0):
    """A scorer for `repair`: exact-match accuracy of a runnable folder on held-out scenes 0..n-1 (`evaluate_shapes`)."""
    if n < 1:
        raise UserError(f"n = {n} held-out scenes; pass n >= 1")

    def score(folder: Path) -> dict:
        model = open_model(folder, "fp32")
        try:
            ev = evaluate_shapes(model, n=n, seed=seed, progress=False)
        finally:
            release(model)
        return {"correct": ev.table["all"]["correct"], "total": ev.table["all"]["total"], "predictions": ev.predictions}

    return score


__all__ = ["CALIBRATION_STREAM", "calibration_prompts", "calibration_scene", "heldout_scorer"]
