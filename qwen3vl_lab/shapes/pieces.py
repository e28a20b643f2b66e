"""Which pieces of an export matter for right answers: 3-D positions and DeepStack, measured on the shapes task.

    variants = piece_variants("models/shapes-onnx", out_dir="pieces")   # our fp32 export with one piece removed
    models = {"ours": load_model("models/shapes-onnx"), **{k: load_model(v) for k, v in variants.items()},
              "guide": guide}                                # e.g. the guide's fp32, run with our vision graph
    result = piece_accuracy(models, reference="ours", n=6)
    print(result.table())

Every model answers every question of n held-out scenes twice:
- **with the image**: exact match against the task's answer (there is a right answer);
- **without it** (a text-only prompt): the shapes model never saw such prompts in training, so there is no
  right answer; each answer is compared with the reference's answer to the same prompt.

What to expect: for a text-only prompt MRoPE's three position rows are equal, so 1-D positions give the
same rotary angles, and DeepStack adds image features only at image tokens: removing either piece leaves
text answers unchanged. Image tokens get (t, h, w) positions that 1-D RoPE cannot express, and the
trained model reads the DeepStack features: removing either should break image answers.

The variants are `debug.breakage.make_broken` copies of the fp32 folder (`positions_1d`: the rotary
embedding reads only the T row of position_ids; `no_deepstack`: the decoder ignores deepstack_embeds),
made once into `out_dir`, keyed by a content hash of the source export.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from tqdm.auto import tqdm

from ..debug.breakage import make_broken
from ..debug.variants import fp32_source, source_fingerprint
from ..errors import UserError
from ..export.cache import build_once
from ..generate import generate_tokens, prepare_prompt
from ..model import Model
from ..sampling import greedy
from . import task as shapes
from .evaluate import MAX_NEW_TOKENS, ShapesEval, evaluate_shapes

# the name of a variant -> the make_broken edits that remove its piece from our decoder, in order
PIECES: dict[str, tuple[str, ...]] = {
    "no 3-D positions": ("positions_1d",),
    "no DeepStack": ("no_deepstack",),
    "neither": ("no_deepstack", "positions_1d"),
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def piece_variants(model_dir: str | Path, out_dir: str | Path, names=tuple(PIECES)) -> dict[str, Path]:
    """Our fp32 export (`model_dir`, or its cpu-fp32/) with each named piece removed -> {name: precision folder}.

    Each variant is built once into out_dir/<name>-<hash of the source export> (a temp folder renamed
    into place); a second call reuses it."""
    src = fp32_source(model_dir)
    unknown = [n for n in names if n not in PIECES]
    if unknown:
        raise UserError(f"unknown piece variant {unknown[0]!r}; choose from {', '.join(PIECES)}")
    key = source_fingerprint(src)
    out = {}
    for name in names:
        def build(tmp: Path, kinds=PIECES[name]) -> None:
            current = src
            for i, kind in enumerate(kinds):
                previous, current = current, make_broken(current, tmp / f"step{i}-{kind}", kind)
                if previous != src:
                    shutil.rmtree(previous)
            current.rename(tmp / "fp32")

        out[name] = build_once(Path(out_dir) / f"{_slug(name)}-{key}", build) / "fp32"
    return out


def text_answer(model: Model, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """One question without an image, greedy, through the ONNX pipeline -> the answer text."""
    tokens = list(generate_tokens(model, prepare_prompt(model, question), greedy, max_new_tokens))
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


@dataclass
class PieceRow:
    """One model's answers: image questions scored against the task, text-only ones against the reference."""

    name: str
    image: ShapesEval
    text_answers: list[str] = field(repr=False)
    text_same: float  # share of text-only answers identical to the reference's
    missing_used: list[str] = field(default_factory=list)  # what the runtime said this decoder ran without

    def accuracy(self, key: str = "all") -> float:
        """Exact-match accuracy on image questions: a question type ("colour", ...), "1_object"/"2_object" or "all"."""
        if key not in self.image.table:
            raise UserError(f"no accuracy for {key!r}; choose from {', '.join(self.image.table)}")
        return float(self.image.table[key]["accuracy"])


@dataclass
class PieceResult:
    rows: list[PieceRow]
    reference: str
    text_questions: list[str]
    n: int

    def row(self, name: str) -> PieceRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise UserError(f"{name!r} was not evaluated; evaluated: {', '.join(r.name for r in self.rows)}")

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def table(self) -> str:
        kinds = [k for k in shapes.QUESTION_TYPES if k in self.rows[0].image.table]
        n_image = self.rows[0].image.table["all"]["total"]
        head = (f"{'model':20s} " + " ".join(f"{k[:8]:>8s}" for k in kinds)
                + f" {'image':>6s} {'text=' + self.reference[:8]:>14s}  ran without")
        lines = [f"{self.n} held-out scenes: {n_image} image questions (exact match); the same "
                 f"{len(self.text_questions)} distinct questions without the image (same answer as {self.reference}?)",
                 head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name[:20]:20s} " + " ".join(f"{r.accuracy(k):8.0%}" for k in kinds)
                         + f" {r.accuracy():6.0%} {r.text_same:14.0%}  "
                         + ("; ".join(m.split(":")[0] for m in r.missing_used) or "-"))
        return "\n".join(lines)


def piece_accuracy(models: Mapping[str, Model], reference: str, n: int = 6, seed: int = 0,
                   progress: bool = False) -> PieceResult:
    """Every model on the image questions of held-out scenes 0..n-1 and on the same questions without the image.

    A decoder that lacks a piece runs image prompts only when opened with accept_missing=True (what it ran
    without is recorded in the row); a foreign export needs a vision graph (`model.borrow_vision(ours)`)."""
    if reference not in models:
        raise UserError(f"reference {reference!r} is not one of the models: {', '.join(models)}")
    questions = sorted({qa.question for _, objects in shapes.heldout_set(n, seed)
                        for qa in shapes.question_answer_pairs(objects)})
    answers = {name: [text_answer(m, q) for q in questions]
               for name, m in tqdm(models.items(), desc="text-only", disable=not progress)}
    rows = []
    for name, m in models.items():
        image = evaluate_shapes(m, n=n, seed=seed, progress=progress)
        same = sum(a == b for a, b in zip(answers[name], answers[reference])) / max(1, len(questions))
        rows.append(PieceRow(name, image, answers[name], same, list(m.teaching_decoder.missing_used)))
    return PieceResult(rows, reference, questions, n)


__all__ = ["PIECES", "PieceResult", "PieceRow", "piece_accuracy", "piece_variants", "text_answer"]
