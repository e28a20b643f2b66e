"""The "shapes" task: synthetic images of one or two simple shapes, and questions about them.

numpy + PIL only (no torch): training (`qwen3vl_lab/train/train_shapes.py`), the ONNX evaluation
(`qwen3vl-lab eval-shapes`) and the notebooks all build their data here.

    image, objects = make_scene(7)                                   # a random scene from seed 7
    image, objects = make_scene([("red", "circle", "left")])         # or from a spec
    for qa in question_answer_pairs(objects):
        print(qa.kind, qa.question, "->", qa.answer)                 # colour  What colour is the circle? -> Red.
    objects[0].cell                                                  # 3: the image token that holds it

The image is 96 x 96 pixels, a 3 x 3 grid of 32-pixel cells. With Qwen3-VL's 16-pixel patches
merged 2 x 2, one LLM image token covers exactly one cell, in reading order (cell = row * 3 + col),
so `object.cell` is also the index of the object's token among the prompt's 9 `<|image_pad|>` tokens.
Each object lies inside its own cell; its size, offset and colour shade vary continuously, so a
fresh seed gives an image never seen before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError
from ..limits import MAX_HELDOUT

IMAGE_SIZE = 96  # pixels per side
GRID = 3  # cells per side
CELL = IMAGE_SIZE // GRID  # 32 pixels: one merged 2 x 2 block of 16-pixel patches = one LLM token
N_CELLS = GRID * GRID
SUPERSAMPLE = 4  # draw at 4x, then downsample: smooth edges
BACKGROUND = (255, 255, 255)

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 195, 30),
}
# cell -> (name used in specs, phrase used in answers)
POSITIONS: tuple[tuple[str, str], ...] = (
    ("top left", "at the top left"), ("top", "at the top"), ("top right", "at the top right"),
    ("left", "on the left"), ("center", "in the center"), ("right", "on the right"),
    ("bottom left", "at the bottom left"), ("bottom", "at the bottom"), ("bottom right", "at the bottom right"),
)
POSITION_NAMES = tuple(name for name, _ in POSITIONS)
QUESTION_TYPES = ("describe", "colour", "position", "shape")

MIN_RADIUS, MAX_RADIUS = 8.5, 13.0  # half the object's size, pixels
MARGIN = 1.5  # pixels kept free between an object and its cell's border
COLOUR_JITTER = 18  # +- per channel


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. `cell` (0..8, reading order) is also its image-token index."""

    shape: str
    colour: str
    cell: int
    center: tuple[float, float] | None = None  # (x, y) pixels; None = the cell's centre
    radius: float = 11.0
    rgb: tuple[int, int, int] | None = None  # None = the colour's base shade

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def position(self) -> str:
        """'top left', 'left', 'center', ..."""
        return POSITIONS[self.cell][0]

    @property
    def phrase(self) -> str:
        """'at the top left', 'on the left', 'in the center', ..."""
        return POSITIONS[self.cell][1]

    @property
    def xy(self) -> tuple[float, float]:
        return self.center if self.center is not None else cell_center(self.cell)

    def describe(self) -> str:
        """'a red circle on the left'"""
        return f"a {self.colour} {self.shape} {self.phrase}"


@dataclass(frozen=True)
class QA:
    """One question about a scene and its exact expected answer."""

    kind: str  # one of QUESTION_TYPES
    question: str
    answer: str
    cells: tuple[int, ...]  # the cells (image tokens) of the object(s) the answer is about
    word: str | None = None  # the answer's key word ("red", "circle", "left"...), None for describe


# ------------------------------------------------------------------------------------- geometry
def cell_center(cell: int) -> tuple[float, float]:
    """(x, y) pixel centre of a cell."""
    row, col = divmod(int(cell), GRID)
    return (col + 0.5) * CELL, (row + 0.5) * CELL


def cell_of_point(x: float, y: float) -> int:
    """The cell (= image token index) that contains pixel (x, y)."""
    col = min(GRID - 1, max(0, int(x // CELL)))
    row = min(GRID - 1, max(0, int(y // CELL)))
    return row * GRID + col


def object_cell(obj: ShapeObject) -> int:
    """The image-token index (0..8) whose 32 x 32 cell holds the object: for attention statistics."""
    return cell_of_point(*obj.xy)


def cell_grid(values: Sequence[float]) -> np.ndarray:
    """Per-token values (9,) -> (3, 3) in image layout, e.g. attention over the 9 image tokens."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (N_CELLS,):
        raise UserError(f"cell_grid takes {N_CELLS} values (one per image token), got shape {v.shape}")
    return v.reshape(GRID, GRID)


# ------------------------------------------------------------------------------------- scenes
def _check_object(obj: ShapeObject) -> ShapeObject:
    if obj.shape not in SHAPES:
        raise UserError(f"unknown shape {obj.shape!r}; use one of {', '.join(SHAPES)}")
    if obj.colour not in COLOURS:
        raise UserError(f"unknown colour {obj.colour!r}; use one of {', '.join(COLOURS)}")
    if not 0 <= int(obj.cell) < N_CELLS:
        raise UserError(f"cell {obj.cell} is outside the 3 x 3 grid; use 0..8 or a position name")
    return obj


def _parse_cell(position) -> int:
    if isinstance(position, (int, np.integer)) and not isinstance(position, bool):
        return int(position)
    if isinstance(position, str) and position.strip().lower() in POSITION_NAMES:
        return POSITION_NAMES.index(position.strip().lower())
    raise UserError(f"position {position!r} is unknown; use a cell 0..8 or one of: {', '.join(POSITION_NAMES)}")


def _spec_object(spec) -> ShapeObject:
    """ShapeObject, (colour, shape, position) or {"colour":, "shape":, "position"/"cell":} -> ShapeObject."""
    if isinstance(spec, ShapeObject):
        return _check_object(spec)
    if isinstance(spec, dict):
        where = spec.get("cell", spec.get("position"))
        return _check_object(ShapeObject(shape=spec.get("shape"), colour=spec.get("colour", spec.get("color")),
                                         cell=_parse_cell(where)))
    if isinstance(spec, (tuple, list)) and len(spec) == 3:
        colour, shape, where = spec
        return _check_object(ShapeObject(shape=shape, colour=colour, cell=_parse_cell(where)))
    raise UserError(f"object spec {spec!r} is not understood; pass (colour, shape, position), e.g. ('red', 'circle', 'left')")


def check_objects(objects: Sequence[ShapeObject]) -> tuple[ShapeObject, ...]:
    """One or two objects, in different cells, with different shapes and different colours
    (so every question names exactly one object)."""
    objects = tuple(objects)
    if not 1 <= len(objects) <= 2:
        raise UserError(f"a scene has one or two objects, got {len(objects)}")
    for what in ("cell", "shape", "colour"):
        values = [getattr(o, what) for o in objects]
        if len(set(values)) != len(values):
            raise UserError(f"two objects share the {what} {values[0]!r}; give each object its own {what}")
    return tuple(sorted(objects, key=lambda o: o.cell))


def random_objects(rng: np.random.Generator, n_objects: int | None = None) -> tuple[ShapeObject, ...]:
    """One or two random objects (n_objects None: either, equally likely), sizes and shades jittered."""
    n = int(rng.integers(1, 3)) if n_objects is None else int(n_objects)
    if n not in (1, 2):
        raise UserError(f"n_objects must be 1 or 2, got {n_objects}")
    shapes = rng.permutation(len(SHAPES))[:n]
    colours = rng.permutation(len(COLOURS))[:n]
    cells = rng.permutation(N_CELLS)[:n]
    names = list(COLOURS)
    objects = []
    for s, c, cell in zip(shapes, colours, cells):
        radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
        room = CELL / 2 - radius - MARGIN  # how far the centre may move and keep the shape in its cell
        cx, cy = cell_center(int(cell))
        dx, dy = rng.uniform(-room, room, size=2)
        base = np.array(COLOURS[names[c]])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))
        objects.append(ShapeObject(SHAPES[s], names[c], int(cell), (cx + float(dx), cy + float(dy)), radius, rgb))
    return check_objects(objects)


def _polygon(obj: ShapeObject, scale: int) -> list[tuple[float, float]] | None:
    x, y = obj.xy
    r = obj.radius
    if obj.shape == "square":
        h = r * 0.86  # about the circle's area
        pts = [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    elif obj.shape == "triangle":
        pts = [(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)]
    else:
        return None
    return [(px * scale, py * scale) for px, py in pts]


def draw_scene(objects: Sequence[ShapeObject]) -> Image.Image:
    """Render objects on a white 96 x 96 RGB image (drawn 4x larger, then downsampled)."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj in objects:
        fill = obj.rgb or COLOURS[obj.colour]
        poly = _polygon(obj, s)
        if poly is None:
            x, y = obj.xy
            r = obj.radius
            draw.ellipse([(x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def make_scene(seed_or_spec=0, n_objects: int | None = None) -> tuple[Image.Image, tuple[ShapeObject, ...]]:
    """A scene -> (96 x 96 PIL image, objects in reading order).

    seed_or_spec: an int seed (random scene; n_objects 1, 2 or None = either), a numpy Generator, or
    a list of objects: ShapeObject, ("red", "circle", "left") or {"colour", "shape", "position"}.
    """
    if isinstance(seed_or_spec, np.random.Generator):
        objects = random_objects(seed_or_spec, n_objects)
    elif isinstance(seed_or_spec, (int, np.integer)) and not isinstance(seed_or_spec, bool):
        if seed_or_spec < 0:
            raise UserError(f"seed must be >= 0, got {seed_or_spec}")
        objects = random_objects(np.random.default_rng(int(seed_or_spec)), n_objects)
    elif isinstance(seed_or_spec, (list, tuple)):
        objects = check_objects([_spec_object(s) for s in seed_or_spec])
    else:
        raise UserError(f"make_scene takes a seed or a list of objects, not {type(seed_or_spec).__name__}; "
                        "e.g. make_scene(3) or make_scene([('red', 'circle', 'left')])")
    return draw_scene(objects), objects


# ------------------------------------------------------------------------------------- questions
def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def describe_scene(objects: Sequence[ShapeObject]) -> str:
    """'A red circle on the left.' / 'A red circle on the left and a blue square at the bottom.'"""
    return _cap(" and ".join(o.describe() for o in objects)) + "."


def _objects_of(scene) -> tuple[ShapeObject, ...]:
    """Accept objects, or the (image, objects) pair make_scene returns."""
    if isinstance(scene, tuple) and len(scene) == 2 and isinstance(scene[0], Image.Image):
        scene = scene[1]
    return check_objects(scene)


def question_answer_pairs(scene, kinds: Iterable[str] = QUESTION_TYPES) -> list[QA]:
    """Every question of the task about a scene (objects or make_scene's pair), with exact answers.

    describe: "What is in the image?"            -> "A red circle on the left."
    colour:   "What colour is the circle?"       -> "Red."
    position: "Where is the circle?"             -> "On the left."
    shape:    "What shape is the red object?"    -> "A circle."
    One describe question per scene; colour, position and shape once per object.
    """
    objects = _objects_of(scene)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in QUESTION_TYPES]
    if bad:
        raise UserError(f"unknown question type {bad[0]!r}; use {', '.join(QUESTION_TYPES)}")
    out = []
    if "describe" in kinds:
        out.append(QA("describe", "What is in the image?", describe_scene(objects), tuple(o.cell for o in objects)))
    for o in objects:
        if "colour" in kinds:
            out.append(QA("colour", f"What colour is the {o.shape}?", f"{_cap(o.colour)}.", (o.cell,), o.colour))
        if "position" in kinds:
            out.append(QA("position", f"Where is the {o.shape}?", f"{_cap(o.phrase)}.", (o.cell,), o.position))
        if "shape" in kinds:
            out.append(QA("shape", f"What shape is the {o.colour} object?", f"A {o.shape}.", (o.cell,), o.shape))
    return out


def all_answers() -> list[str]:
    """Every answer the task can ask for (for the training vocabulary)."""
    answers = [f"{_cap(c)}." for c in COLOURS] + [f"{_cap(p)}." for _, p in POSITIONS] + [f"A {s}." for s in SHAPES]
    one = [ShapeObject(s, c, cell) for s in SHAPES for c in COLOURS for cell in range(N_CELLS)]
    answers += [describe_scene([o]) for o in one]
    answers += [describe_scene([a, b]) for a in one for b in one if a.cell < b.cell and a.shape != b.shape
                and a.colour != b.colour]
    return answers


# ------------------------------------------------------------------------------------- datasets
HELDOUT_STREAM = 1_000_003  # held-out scenes come from seed sequences [HELDOUT_STREAM, seed, i]
TRAIN_STREAM = 7  # training batches come from [TRAIN_STREAM, seed, step]


def heldout_scene(i: int, seed: int = 0, n_objects: int | None = None) -> tuple[Image.Image, tuple[ShapeObject, ...]]:
    """Held-out scene i: from a seed stream that training never draws from.

    n_objects None alternates 1 and 2 objects (even i: one object)."""
    n = (1 if i % 2 == 0 else 2) if n_objects is None else n_objects
    return make_scene(np.random.default_rng([HELDOUT_STREAM, seed, i]), n_objects=n)


def check_heldout_count(n, name: str = "n") -> int:
    """A held-out scene count is a whole number in [1, MAX_HELDOUT]: beyond it the scenes would be built (and held
    in memory) for hours before the first answer, for an interval no narrower than a useful one."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_HELDOUT:
        shown = repr(n) if len(repr(n)) <= 30 else repr(n)[:27] + "..."
        raise UserError(f"{name} = {shown} held-out scenes; pass a whole number from 1 to {MAX_HELDOUT:,} "
                        "(200 gives accuracy within about +-3 %)")
    return int(n)


def heldout_set(n: int, seed: int = 0, n_objects: int | None = None) -> list[tuple[Image.Image, tuple[ShapeObject, ...]]]:
    """The first n held-out scenes (deterministic); n is at most MAX_HELDOUT."""
    return [heldout_scene(i, seed, n_objects) for i in range(check_heldout_count(n))]


def training_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of one training batch: a pure function of (seed, step), never a held-out stream."""
    return np.random.default_rng([TRAIN_STREAM, seed, step])


def exact_match(prediction: str, answer: str) -> bool:
    """The task's metric: the whole answer, whitespace at the ends ignored."""
    return prediction.strip() == answer.strip()


def heldout_questions(n: int, seed: int = 0):
    """Every question of the first n held-out scenes -> (images, QAs, n_objects), one entry per question."""
    images, qas, counts = [], [], []
    for image, objects in heldout_set(n, seed):
        for qa in question_answer_pairs(objects):
            images.append(image)
            qas.append(qa)
            counts.append(len(objects))
    return images, qas, counts


def accuracy_table(qas, predictions: list[str], counts: list[int]) -> dict:
    """Exact-match accuracy per question type, per object count, and overall."""
    right = [exact_match(p, qa.answer) for p, qa in zip(predictions, qas)]
    table = {}
    for kind in QUESTION_TYPES:
        sel = [r for r, qa in zip(right, qas) if qa.kind == kind]
        if sel:
            table[kind] = {"correct": int(sum(sel)), "total": len(sel), "accuracy": sum(sel) / len(sel)}
    for n in (1, 2):
        sel = [r for r, c in zip(right, counts) if c == n]
        if sel:
            table[f"{n}_object"] = {"correct": int(sum(sel)), "total": len(sel), "accuracy": sum(sel) / len(sel)}
    table["all"] = {"correct": int(sum(right)), "total": len(right), "accuracy": sum(right) / max(1, len(right))}
    return table


def format_table(table: dict) -> str:
    return "\n".join(f"  {k:<10} {v['accuracy'] * 100:6.1f}%  ({v['correct']}/{v['total']})" for k, v in table.items())
