"""`qwen3vl-lab demo`: the trained shapes model answers questions about a scene it never saw, step by step.

    qwen3vl-lab demo                      # held-out scene 0; saves qwen3vl-lab-demo.png (+ -scene.png)
    qwen3vl-lab demo --scene 5 --json     # another scene; one JSON object for scripts

What it does, all on the ONNX pipeline (no torch):
1. the shipped trained shapes model (`qwen3vl_lab/data/shapes_model/`), exported into the cache on first
   use (`apps.notebook.shapes_model_dir`, the export notebooks 04-06 use too);
2. one held-out scene (`shapes.task.heldout_scene`: a seed stream training never drew from) and every
   question of the task about it, answered greedily, printed next to the truth `shapes.task` knows;
3. one answer step by step: the prompt's tokens and 3-D positions, then each decoder call with the
   token it read, its position (t, h, w), the KV cache's length and bytes, and the token it chose;
4. a picture (scene, answers, cache growth) and where to go next.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..export.files import staging_file
from ..generate import generate_step, prepare_multimodal_prompt
from ..model import Model, RuntimeOptions, load_model
from ..paths import as_path, existing_dir
from ..sampling import greedy
from ..shapes import task as shapes
from ..shapes.evaluate import MAX_NEW_TOKENS, answer, cached_vision
from ..viz.figure import COLORS, empty_figure
from ..viz.trace import token_labels
from .notebook import shapes_model_dir

DEFAULT_PICTURE = "qwen3vl-lab-demo.png"
UPSCALE = 4  # the 96 x 96 scene drawn 4x larger in the picture


@dataclass
class DemoConfig:
    scene: int = 0  # held-out scene index (even: one object, odd: two)
    picture: str = DEFAULT_PICTURE  # the figure; the scene itself goes beside it as <stem>-scene.png
    threads: int | None = None  # onnxruntime intra-op threads
    progress: bool = True  # the export's progress bar on first use


@dataclass
class Answer:
    kind: str  # describe / colour / position / shape
    question: str
    answer: str  # the model's, greedy
    truth: str  # shapes.task's
    correct: bool  # exact match (shapes.task.exact_match)


@dataclass
class DecoderCall:
    """One decoder call of the step-by-step view."""

    index: int  # 0: prefill, then one per decode step
    kind: str  # "prefill" or "decode"
    fed: str  # what went in: "27 tokens" (prefill) or the token read back
    position: list[int]  # (t, h, w) of the last position fed
    cache_length: int  # positions in the KV cache after the call
    cache_bytes: int  # keys + values, all layers
    chose: str  # the token greedy picked from this call's logits


@dataclass
class StepView:
    question: str
    prompt_tokens: list[str]  # the prompt, token by token (image pads included)
    positions: list[list[int]]  # (3, S): rows t, h, w
    image_positions: list[list[int]]  # (3, image tokens): where the 9 cells sit
    rope_delta: int  # next text position = sequence index + rope_delta
    calls: list[DecoderCall] = field(default_factory=list)


@dataclass
class DemoResult:
    model_dir: str
    scene: int
    objects: list[str]  # "a red circle on the left", ...
    answers: list[Answer]
    steps: StepView
    picture: str
    scene_picture: str
    seconds: float  # wall time of the whole demo (export on first use included)
    notices: list[str] = field(default_factory=list)

    @property
    def right(self) -> int:
        return sum(a.correct for a in self.answers)

    def to_json(self) -> dict:
        return {**asdict(self), "right": self.right, "total": len(self.answers)}


# -- input -------------------------------------------------------------------------------------
def picture_path(value: str) -> Path:
    """The figure's path, checked before any work: a .png file in an existing, writable folder."""
    path = as_path(value, "--picture")
    if path.is_dir():
        raise UserError(f"--picture {path} is a folder; pass a file name ending in .png inside it")
    if path.suffix.lower() != ".png":
        raise UserError(f"--picture {path} is not a .png path; pass a file name ending in .png (e.g. {DEFAULT_PICTURE})")
    folder = existing_dir(path.parent, "--picture's folder", fix="create it first, or pass a path in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--picture {path} cannot be written: {folder} is not writable by you; pass a path in a folder "
                        "you can write to")
    return path


def scene_picture_path(picture: Path) -> Path:
    return picture.with_name(f"{picture.stem}-scene.png")


# -- the demo ----------------------------------------------------------------------------------
def ask_all(model: Model, image, objects, encoder) -> list[Answer]:
    """Every question of the task about the scene, answered greedily through the ONNX pipeline."""
    out = []
    for qa in shapes.question_answer_pairs(objects):
        said = answer(model, image, qa.question, encoder)
        out.append(Answer(qa.kind, qa.question, said, qa.answer, shapes.exact_match(said, qa.answer)))
    return out


def step_view(model: Model, image, question: str, encoder=None) -> StepView:
    """One question, decoder call by decoder call: tokens, positions, cache growth."""
    prompt = prepare_multimodal_prompt(model, question, images=[image], encoder=encoder)
    ids = prompt.input_ids[0]  # (S,)
    positions = prompt.positions.position_ids[:, 0, :]  # (3, S)
    image_cols = np.flatnonzero(ids == model.config.image_token_id)  # (9,)
    view = StepView(question, token_labels(model.tokenizer, ids, model.config), positions.tolist(),
                    positions[:, image_cols].tolist(), int(prompt.positions.rope_deltas[0, 0]))
    fed = f"{len(ids)} tokens"
    for s in generate_step(model, prompt, greedy, MAX_NEW_TOKENS):
        token = int(s.tokens[0])
        cache = s.step.cache
        view.calls.append(DecoderCall(s.index, "prefill" if s.index == 0 else "decode", fed,
                                      s.step.position_ids[:, 0, -1].tolist(), cache.length, cache.nbytes,
                                      model.tokenizer.decode([token])))
        fed = repr(model.tokenizer.decode([token]))
    return view


def run_demo(cfg: DemoConfig, log=lambda line: print(line, file=sys.stderr)) -> DemoResult:
    """The whole demo -> DemoResult (the picture is written, the text is not printed: see `print_demo`)."""
    t0 = time.perf_counter()
    picture = picture_path(cfg.picture)
    if cfg.scene < 0:
        raise UserError(f"--scene {cfg.scene} is negative; pass a held-out scene index 0, 1, 2, ...")
    model_dir = shapes_model_dir(progress=cfg.progress, log=log)
    model = load_model(model_dir, "fp32", RuntimeOptions(threads=cfg.threads))
    image, objects = shapes.heldout_scene(cfg.scene)
    encoder = cached_vision(model)  # the vision tower runs once for all questions
    answers = ask_all(model, image, objects, encoder)
    steps = step_view(model, image, answers[1].question, encoder)  # the first object's colour: a one-word answer
    scene_file = scene_picture_path(picture)
    with staging_file(scene_file) as tmp:
        image.save(tmp, format="PNG")
    result = DemoResult(str(model_dir), cfg.scene, [o.describe() for o in objects], answers, steps, str(picture),
                        str(scene_file), 0.0)
    save_picture(result, image, picture)
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


# -- output ------------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return "yes" if ok else "NO"


def _prompt_line(view: StepView) -> str:
    """The prompt's tokens on one line, a run of one repeated token (the image pads) shown once with its count."""
    out: list[list] = []  # [label, count]
    for label in view.prompt_tokens:
        if out and out[-1][0] == label:
            out[-1][1] += 1
        else:
            out.append([label, 1])
    return " ".join((label if n == 1 else f"{label}x{n}").replace("\n", "\\n") for label, n in out)


def _image_positions(view: StepView) -> str:
    rows = np.asarray(view.image_positions)  # (3, image tokens)
    if not rows.shape[1]:
        return "no image tokens"
    t, h, w = (f"{r.min()}" if r.min() == r.max() else f"{r.min()}..{r.max()}" for r in rows)
    return f"{rows.shape[1]} image tokens (one per 32 x 32 cell): t = {t}, h = {h}, w = {w}"


def format_answers(result: DemoResult) -> str:
    rows = [f"held-out scene {result.scene} (never seen in training): {'; '.join(result.objects)}", "",
            ""]
    q = max(len(a.question) for a in result.answers)
    w = max(len(text) for a in result.answers for text in (a.answer, a.truth, "model says"))
    rows[-1] = f"  {'question':<{q}}  {'model says':<{w}}  {'truth':<{w}}  right"
    for a in result.answers:
        rows.append(f"  {a.question:<{q}}  {a.answer:<{w}}  {a.truth:<{w}}  {_mark(a.correct)}")
    rows.append(f"\n  {result.right}/{len(result.answers)} exact matches")
    return "\n".join(rows)


def format_steps(view: StepView) -> str:
    rows = [f"one answer, step by step: {view.question!r}",
            f"  prompt ({len(view.prompt_tokens)} tokens, chat template): {_prompt_line(view)}",
            f"  positions (t, h, w): text tokens count up with t = h = w; {_image_positions(view)}; "
            f"after the image the text goes on from the largest position + 1 (rope_deltas {view.rope_delta})",
            "",
            f"  {'call':<5} {'kind':<8} {'fed':<12} {'position (t,h,w)':<18} {'KV cache':>9} {'bytes':>10}  chose"]
    for c in view.calls:
        rows.append(f"  {c.index:<5} {c.kind:<8} {c.fed:<12} {str(tuple(c.position)):<18} {c.cache_length:>9} "
                    f"{c.cache_bytes:>10,}  {c.chose!r}")
    return "\n".join(rows)


def next_steps(result: DemoResult) -> str:
    return "\n".join([
        "where to go next:",
        f"  qwen3vl-lab generate --image {result.scene_picture} --prompt \"Where is the {_shape(result)}?\"   "
        "# the same model, your question",
        "  jupyter lab notebooks/            # the notebooks: positions, KV cache, vision, INT4, attention, the doctor",
        "  qwen3vl-lab make-tiny --trained --output_dir models/shapes && qwen3vl-lab export --hf_dir models/shapes "
        "--output_dir models/shapes-onnx --precision fp32 int4 && qwen3vl-lab doctor --model_dir models/shapes-onnx"
        "   # fp32 vs INT4",
        "  qwen3vl-lab export --hf_dir /path/to/Qwen3-VL-2B-Instruct --output_dir models/2b   # your own model",
        "  mkdocs serve                      # the documentation site, at http://127.0.0.1:8000",
    ])


def _shape(result: DemoResult) -> str:
    return result.objects[0].split()[2]  # "a red circle on the left" -> "circle"


def print_demo(result: DemoResult) -> None:
    print(format_answers(result))
    print()
    print(format_steps(result.steps))
    print()
    print(f"picture: {result.picture} (the scene alone: {result.scene_picture}); {result.seconds:.1f} s in all")
    print()
    print(next_steps(result))


def save_picture(result: DemoResult, image, path: Path) -> None:
    """Scene | questions with the model's answers | KV cache length per decoder call."""
    fig = empty_figure(figsize=(12.0, 4.2))
    grid = fig.add_gridspec(1, 3, width_ratios=[1.0, 2.2, 1.1], wspace=0.05)
    ax = fig.add_subplot(grid[0])
    ax.imshow(np.asarray(image.resize((image.width * UPSCALE, image.height * UPSCALE), 0)))  # 0: nearest
    ax.set_title(f"held-out scene {result.scene}")
    ax.set_xticks([])
    ax.set_yticks([])  # the frame stays: the scene's white background ends there
    ax = fig.add_subplot(grid[1])
    ax.axis("off")
    ax.set_title(f"ONNX answers: {result.right}/{len(result.answers)} match the truth")
    for i, a in enumerate(result.answers):
        y = 0.95 - i * 0.13
        ax.text(0.0, y, a.question, fontsize=9, transform=ax.transAxes)
        ax.text(0.0, y - 0.055, f"{a.answer}" + ("" if a.correct else f"   (truth: {a.truth})"), fontsize=9,
                color=COLORS["image"] if a.correct else COLORS["video"], transform=ax.transAxes, weight="bold")
    ax = fig.add_subplot(grid[2])
    calls = result.steps.calls
    ax.bar([c.index for c in calls], [c.cache_length for c in calls],
           color=[COLORS[c.kind] for c in calls])
    ax.set_xlabel("decoder call (0 = prefill)")
    ax.set_ylabel("KV cache positions")
    ax.set_title(f"answering {result.steps.question!r}", fontsize=9)
    with staging_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")

