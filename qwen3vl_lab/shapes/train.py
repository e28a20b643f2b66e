"""Train the tiny Qwen3-VL of the "shapes" task (qwen3vl_lab/shapes.py) on CPU, from scratch.

    qwen3vl-lab train-shapes --output_dir runs/shapes            # ~20 min on 2 CPU cores
    python -m qwen3vl_lab.shapes.train --output_dir runs/shapes --steps 300 --eval_n 50   # a quick try

The model is transformers' own `Qwen3VLForConditionalGeneration`, built from the "shapes" preset of
`export/tiny.py` (real tokenizer and 151936-row vocabulary, interleaved MRoPE, a 2-block vision
tower with DeepStack) with transformers' initialisation. Three things make it learn in minutes:

- a sampled softmax: each step scores only the 44 token ids the task's prompts and answers use plus
  2048 other rows drawn uniformly (their logits get the usual + log(N_other / 2048) correction, so
  the loss estimates the full-vocabulary one). Plain full-vocabulary training stays at chance: the
  image tokens turn into attention sinks and the answers ignore the image.
- only those 44 embedding rows train (`TaskRows`; the rest keep their initial values): a step
  then skips a dense 151936 x 128 gradient and its AdamW update, ~1.4x faster (`--all_rows` trains
  every row, as earlier runs did).
- a curriculum: colour questions about one object, then all questions about one object, then
  scenes with one or two objects, a quarter of them two-object colour/position questions (`--focus`).

What it does not learn: "Where is the <shape>?" when the scene has two objects stays at chance (it
names one of the two). A linear probe reads an object's cell from its image token at 18% (chance 11%):
the vision position embedding (transformers' std 0.02) is tiny next to a patch's content and barely grows.
Re-drawing it larger (`--pos_embed_std 0.1`, random or `--pos_embed_init sincos`) makes the cell
readable (88-93%) but in 6000-step runs slowed everything else (47-67% overall, position still 66%).

Data is generated on the fly and deterministically from (seed, step) (`shapes.training_rng`); the
evaluation at the end uses held-out scenes (`shapes.heldout_set`, a seed stream training never
reads) and greedy `generate()` over the full vocabulary. The output folder is an ordinary
full-vocabulary Hugging Face checkpoint (bf16 by default), plus training.json / TRAINING.md.
`--ship` also copies it into qwen3vl_lab/data/shapes_model (what `make-tiny --trained` gives).

This is the one module of qwen3vl_lab that imports torch (the `train` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import ENDOFTEXT_TOKEN_ID, IM_END_TOKEN_ID, parse_hf_config
from ..errors import ArgumentParser, UserError
from ..export.checkpoint import save_checkpoint_weights
from ..export.files import check_replaceable, replace_folder, staging_folder
from ..export.tiny import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    TRAINED_FILES,
    VIDEO_PREPROCESSOR_CONFIG,
    _write_json,
    copy_tokenizer_files,
    expected_parameter_shapes,
    hf_config_dict,
    preprocessor_config,
    trained_model_dir,
)
from ..image import ImageProcessorConfig, preprocess
from ..paths import output_dir as checked_output_dir
from ..positions import mm_token_type_ids
from ..tokenizer import encode_prompt, format_chat, load_tokenizer
from . import task as shapes

# what a --output_dir written by train-shapes before folders were stamped holds (export/files.py)
TRAINED_OUTPUT = (*TRAINED_FILES, *TOKENIZER_FILES)

PRESET = "shapes"


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 6000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    negatives: int = 2048  # random other vocabulary rows per step (sampled softmax)
    # curriculum: fractions of the steps at which stage 2 and stage 3 start
    stage2_at: float = 0.08  # until here: colour questions, one object
    stage3_at: float = 0.25  # until here: every question type, one object; then one or two objects
    threads: int = 1  # for a model this small one thread steps as fast as two (and two runs fit on 2 cores)
    eval_n: int = 400  # held-out scenes for the final evaluation (every question of each scene)
    eval_seed: int = 0
    dtype: str = "bfloat16"  # of the saved weights
    focus: float = 0.25  # in stage 3, this share of examples: two objects, a question that names a shape
    pos_embed_std: float | None = None  # re-draw the vision position embedding at this std (None: transformers' 0.02)
    pos_embed_init: str = "normal"  # with pos_embed_std: "normal" (random rows) or "sincos" (a 2-D sine-cosine code, as in MAE)
    task_rows: bool = True  # train only the task's embedding rows (~1.4x faster steps); False: every row
    init_from: str | None = None  # continue from this checkpoint folder (a previous run's output) instead of fresh init


@dataclass
class Stage:
    name: str
    n_objects: tuple[int, ...]
    kinds: tuple[str, ...]


STAGES = (
    Stage("colour, one object", (1,), ("colour",)),
    Stage("all questions, one object", (1,), shapes.QUESTION_TYPES),
    Stage("all questions, one or two objects", (1, 2), shapes.QUESTION_TYPES),
)


def stage_of(step: int, cfg: TrainConfig) -> Stage:
    frac = step / max(1, cfg.steps)
    return STAGES[0] if frac < cfg.stage2_at else STAGES[1] if frac < cfg.stage3_at else STAGES[2]


# ------------------------------------------------------------------------------------- data
class Encoder:
    """Question/answer text -> token ids through the real chat template (cached: there are few)."""

    def __init__(self, tokenizer, image_config: ImageProcessorConfig):
        self.tokenizer = tokenizer
        self.image_config = image_config
        grid_side = shapes.IMAGE_SIZE // image_config.patch_size
        self.grid = np.array([[1, grid_side, grid_side]], np.int64)  # (1, 3): 96 px -> 6 x 6 patches
        self._prompts: dict[str, np.ndarray] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt(self, question: str) -> np.ndarray:
        """(S,) ids of one user turn: the image (9 <|image_pad|>), then the question; ends 'assistant\\n'."""
        if question not in self._prompts:
            text = format_chat(self.tokenizer, question, images=1)
            self._prompts[question] = encode_prompt(self.tokenizer, text, image_grid_thw=self.grid,
                                                    merge_size=self.image_config.merge_size)
        return self._prompts[question]

    def answer(self, answer: str) -> list[int]:
        """The assistant's tokens: the answer, then <|im_end|> (the turn's end, which stops generation)."""
        if answer not in self._answers:
            self._answers[answer] = list(self.tokenizer(answer)["input_ids"]) + [IM_END_TOKEN_ID]
        return self._answers[answer]

    def pixels(self, images) -> tuple[np.ndarray, np.ndarray]:
        return preprocess(list(images), self.image_config)  # (B * 36, 1536), (B, 3)


def task_token_ids(encoder: Encoder) -> np.ndarray:
    """Every token id an answer can contain, plus <|im_end|>: the rows scored at every step."""
    ids = {IM_END_TOKEN_ID}
    for a in shapes.all_answers():
        ids.update(encoder.answer(a))
    return np.array(sorted(ids), np.int64)


FOCUS_STAGE = Stage("two objects, colour/position of a named shape", (2,), ("colour", "position"))


def sample_example(rng: np.random.Generator, stage: Stage, focus: float = 0.0):
    """One (image, QA) of a stage: a random scene, a question type, then an object.

    focus > 0 (stage 3 only): that share of examples are two-object questions that name a shape."""
    if focus > 0 and stage is STAGES[2] and rng.random() < focus:
        stage = FOCUS_STAGE
    n_objects = int(rng.choice(stage.n_objects))
    image, objects = shapes.make_scene(rng, n_objects=n_objects)
    kind = stage.kinds[int(rng.integers(len(stage.kinds)))]
    pairs = shapes.question_answer_pairs(objects, kinds=(kind,))
    return image, pairs[int(rng.integers(len(pairs)))]


@dataclass
class Batch:
    input_ids: np.ndarray  # (B, S) right-padded
    attention_mask: np.ndarray  # (B, S)
    pixel_values: np.ndarray  # (B * 36, 1536)
    image_grid_thw: np.ndarray  # (B, 3)
    rows: np.ndarray  # (N,) batch row of each predicted token
    cols: np.ndarray  # (N,) the position whose output predicts it
    targets: np.ndarray  # (N,) the token id to predict
    kinds: list[str] = field(default_factory=list)


def make_batch(encoder: Encoder, cfg: TrainConfig, step: int) -> Batch:
    """The training batch of a step: a pure function of (seed, step)."""
    rng = shapes.training_rng(cfg.seed, step)
    stage = stage_of(step, cfg)
    examples = [sample_example(rng, stage, cfg.focus) for _ in range(cfg.batch_size)]
    seqs, rows, cols, targets = [], [], [], []
    for b, (_, qa) in enumerate(examples):
        prompt, answer = encoder.prompt(qa.question), encoder.answer(qa.answer)
        seqs.append(np.concatenate([prompt, answer]))
        for k, tok in enumerate(answer):
            rows.append(b)
            cols.append(len(prompt) - 1 + k)  # the position before the token predicts it
            targets.append(tok)
    length = max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), ENDOFTEXT_TOKEN_ID, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
        mask[b, :len(s)] = 1
    pixel_values, grid = encoder.pixels([im for im, _ in examples])
    return Batch(ids, mask, pixel_values, grid, np.array(rows), np.array(cols), np.array(targets),
                 [qa.kind for _, qa in examples])


# ------------------------------------------------------------------------------------- model
def sincos_2d(side: int, dim: int) -> np.ndarray:
    """(side * side, dim) 2-D sine-cosine position code (MAE's get_2d_sincos_pos_embed), unit std per row:
    the first half of the channels encode the row, the second half the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")

    def code(pos):  # (side*side,) -> (side*side, dim/2)
        angles = pos.reshape(-1, 1) * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([code(rows), code(cols)], axis=1)
    return (emb / emb.std()).astype(np.float32)


def build_model(seed: int, pos_embed_std: float | None = None, pos_embed_init: str = "normal"):
    """transformers' Qwen3VLForConditionalGeneration with the "shapes" preset config, fresh init.

    pos_embed_std: re-draw the vision position embedding at this std (an experiment, see the module
    docstring). At transformers' 0.02 it is ~40x smaller than a patch's embedding and an object's
    image token carries no linear trace of its cell; larger, the cell becomes readable, but in
    6000-step runs the model learned less, and two-object position questions stayed at chance.
    """
    import torch  # noqa: PLC0415 (torch: the optional [train] extra)
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: PLC0415 (torch: the optional [train] extra)


    torch.manual_seed(seed)
    config = Qwen3VLConfig.from_dict(hf_config_dict(PRESET, dtype="float32"))
    config._attn_implementation = "sdpa"
    model = Qwen3VLForConditionalGeneration(config).float()
    if pos_embed_std is not None:
        table = model.model.visual.pos_embed.weight  # (side * side, vision hidden)
        with torch.no_grad():
            if pos_embed_init == "sincos":
                side = int(round(table.shape[0] ** 0.5))
                table.copy_(torch.as_tensor(sincos_2d(side, table.shape[1])) * pos_embed_std)
            else:
                table.normal_(0.0, pos_embed_std)
    return model


def task_row_ids(encoder: Encoder) -> np.ndarray:
    """Every token id the task's prompts and answers contain, plus the padding id: the rows that train."""
    ids = set(task_token_ids(encoder).tolist()) | {ENDOFTEXT_TOKEN_ID}
    for image_objects in ([shapes.ShapeObject(s, c, 0)] for s in shapes.SHAPES for c in shapes.COLOURS):
        for qa in shapes.question_answer_pairs(image_objects):
            ids.update(encoder.prompt(qa.question).tolist())
    return np.array(sorted(ids), np.int64)


class TaskRows:
    """Train only the task's rows of the tied (V, H) embedding; the other ~151.8k rows stay at init.

    Every input token is one of the task's tokens, so the input embedding reads only the small
    trainable table; the output side scores those rows plus sampled frozen ones. Each step then
    skips a dense (V, H) gradient, its zero-fill and AdamW's update of 19M untouched numbers
    (~1/3 of a step). `restore()` writes the rows back into the full matrix: an ordinary checkpoint.
    """

    def __init__(self, model, row_ids: np.ndarray):
        import torch  # noqa: PLC0415 (torch: the optional [train] extra)

        self.model = model
        self.full = model.model.language_model.embed_tokens  # nn.Embedding; lm_head.weight is the same tensor
        self.full.weight.requires_grad_(False)
        self.row_ids = torch.as_tensor(row_ids)
        lookup = torch.full((self.full.num_embeddings,), -1, dtype=torch.long)
        lookup[self.row_ids] = torch.arange(len(row_ids))
        self.rows = torch.nn.Parameter(self.full.weight[self.row_ids].clone())  # (K, H), the only trained rows
        model.model.language_model.embed_tokens = _rows_embedding(self.rows, lookup)

    def restore(self):
        """Put the trained rows into the full embedding and the full embedding back into the model."""
        import torch  # noqa: PLC0415 (torch: the optional [train] extra)

        with torch.no_grad():
            self.full.weight[self.row_ids] = self.rows.detach()
        self.model.model.language_model.embed_tokens = self.full
        return self.model


def _rows_embedding(rows, lookup):
    """An nn.Module that embeds vocabulary ids from the (K, H) task rows (lookup: vocabulary id -> row or -1)."""
    import torch  # noqa: PLC0415 (torch: the optional [train] extra)

    class RowsEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = rows
            self.register_buffer("lookup", lookup, persistent=False)

        def forward(self, ids):  # (B, S) vocabulary ids -> (B, S, H)
            local = self.lookup[ids]
            if bool((local < 0).any()):
                raise RuntimeError("an input token is not one of the task's rows")
            return self.rows[local]

    return RowsEmbedding()


class SampledSoftmax:
    """Cross-entropy over the task's token rows + `negatives` uniformly drawn other rows.

    Sampled rows get logit + log(N_other / negatives) (the logQ correction for uniform sampling
    without replacement): the sum of their exp then estimates the full vocabulary's.
    With `TaskRows`, call it with (task rows, frozen full matrix): the scored task rows come from
    the trainable table, the sampled ones from the frozen matrix.
    """

    def __init__(self, task_ids: np.ndarray, vocab_size: int, negatives: int, seed: int):
        import torch  # noqa: PLC0415 (torch: the optional [train] extra)

        self.task_ids = torch.as_tensor(task_ids)
        others = np.setdiff1d(np.arange(vocab_size), task_ids)
        self.others = torch.as_tensor(others)
        self.negatives = min(negatives, len(others))
        self.correction = math.log(len(others) / self.negatives)
        lookup = np.full(vocab_size, -1, np.int64)
        lookup[task_ids] = np.arange(len(task_ids))
        self.lookup = torch.as_tensor(lookup)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, hidden, weight, targets, task_weight=None):
        """hidden (N, H), weight (V, H) the output embedding, targets (N,) -> loss, accuracy among the scored rows.

        task_weight (K, H): the task rows' weights, if they live apart from `weight` (TaskRows)."""
        import torch  # noqa: PLC0415 (torch: the optional [train] extra)
        import torch.nn.functional as F  # noqa: PLC0415 (torch: the optional [train] extra)

        pick = torch.randperm(len(self.others), generator=self.generator)[: self.negatives]
        if task_weight is None:
            task_weight = weight[self.task_ids]
        logits = torch.cat([hidden @ task_weight.T, hidden @ weight[self.others[pick]].T + self.correction], dim=1)  # (N, K + n)
        labels = self.lookup[targets]
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, acc


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_step(model, optimizer, loss_fn: SampledSoftmax, batch: Batch, lr: float, grad_clip: float):
    import torch  # noqa: PLC0415 (torch: the optional [train] extra)

    for group in optimizer.param_groups:
        group["lr"] = lr
    ids = torch.as_tensor(batch.input_ids)
    out = model.model(
        input_ids=ids,
        attention_mask=torch.as_tensor(batch.attention_mask),
        pixel_values=torch.as_tensor(batch.pixel_values),
        image_grid_thw=torch.as_tensor(batch.image_grid_thw),
        mm_token_type_ids=torch.as_tensor(mm_token_type_ids(batch.input_ids)),
        use_cache=False,
    )
    hidden = out.last_hidden_state[torch.as_tensor(batch.rows), torch.as_tensor(batch.cols)]  # (N, H)
    embed = model.model.language_model.embed_tokens
    task_weight = embed.rows if hasattr(embed, "rows") else None  # TaskRows: the trainable table holds the task rows
    loss, acc = loss_fn(hidden, model.lm_head.weight, torch.as_tensor(batch.targets), task_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.item(), acc.item()


def make_optimizer(model, cfg: TrainConfig):
    """AdamW; no weight decay on norms and biases."""
    import torch  # noqa: PLC0415 (torch: the optional [train] extra)

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), fused=True)


# ------------------------------------------------------------------------------------- evaluation
def greedy_answers(model, encoder: Encoder, images, questions: list[str], batch_size: int = 64,
                   max_new_tokens: int = 24) -> list[str]:
    """transformers greedy generate() over the full vocabulary, left-padded batches -> answer texts."""
    import torch  # noqa: PLC0415 (torch: the optional [train] extra)

    model.eval()
    texts = []
    for start in range(0, len(questions), batch_size):
        qs, ims = questions[start:start + batch_size], images[start:start + batch_size]
        prompts = [encoder.prompt(q) for q in qs]
        length = max(len(p) for p in prompts)
        ids = np.full((len(prompts), length), ENDOFTEXT_TOKEN_ID, np.int64)
        mask = np.zeros_like(ids)
        for b, p in enumerate(prompts):
            ids[b, length - len(p):] = p
            mask[b, length - len(p):] = 1
        pixel_values, grid = encoder.pixels(ims)
        model.model.rope_deltas = None
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                pixel_values=torch.as_tensor(pixel_values), image_grid_thw=torch.as_tensor(grid),
                mm_token_type_ids=torch.as_tensor(mm_token_type_ids(ids)),
                do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=ENDOFTEXT_TOKEN_ID,
                eos_token_id=[IM_END_TOKEN_ID, ENDOFTEXT_TOKEN_ID],
            )
        for row in out[:, length:].tolist():
            texts.append(encoder.tokenizer.decode(row, skip_special_tokens=True))
    return texts


def evaluate(model, encoder: Encoder, n: int, seed: int = 0) -> tuple[dict, list[str]]:
    images, qas, counts = shapes.heldout_questions(n, seed)
    predictions = greedy_answers(model, encoder, images, [qa.question for qa in qas])
    return shapes.accuracy_table(qas, predictions, counts), predictions


# ------------------------------------------------------------------------------------- saving
def state_tensors(model) -> dict[str, np.ndarray]:
    """The checkpoint's tensors (HF names) as float32 numpy; the tied lm_head is not written."""

    expected = expected_parameter_shapes(parse_hf_config(hf_config_dict(PRESET)))
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    missing = set(expected) - set(state)
    if missing:
        raise RuntimeError(f"the trained model lacks {sorted(missing)[:3]}")
    return {name: state[name] for name in expected}


def write_checkpoint(model, folder: Path, cfg: TrainConfig, record: dict) -> None:
    """An ordinary Hugging Face checkpoint folder: config, generation/preprocessor configs,
    model.safetensors (cfg.dtype), tokenizer files, training.json and TRAINING.md."""

    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config_dict(PRESET, dtype=cfg.dtype)
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {**GENERATION_CONFIG, "transformers_version": config["transformers_version"]})
    _write_json(folder / "preprocessor_config.json", preprocessor_config(PRESET))
    _write_json(folder / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG)
    copy_tokenizer_files(folder)
    save_checkpoint_weights(folder, state_tensors(model), cfg.dtype)
    _write_json(folder / "training.json", record)
    (folder / "TRAINING.md").write_text(training_markdown(record), encoding="utf-8")


def training_markdown(record: dict) -> str:
    cfg = record["config"]
    lines = [
        "# The trained shapes model",
        "",
        "A tiny Qwen3-VL (text hidden 128, 4 layers; vision depth 2, hidden 64, DeepStack after LLM layers 0 and 1;",
        "real tokenizer, 151936-row vocabulary) trained from scratch on the synthetic shapes task",
        "(`qwen3vl_lab/shapes.py`: 96x96 images, 9 image tokens, one per 3x3 cell).",
        "",
        "Retrain (`pip install -e .[train]`; deterministic data; this run's own time on a shared 2-core machine",
        "is under Recipe):",
        "",
        *retrain_commands(record),
        "",
        "## Recipe",
        "",
        f"- AdamW (betas 0.9/0.98, weight decay {cfg['weight_decay']} except norms/biases), lr {cfg['lr']} with "
        f"{cfg['warmup_steps']} warmup steps then cosine to {cfg['lr'] * cfg['min_lr_ratio']:g}, batch {cfg['batch_size']}, "
        f"{cfg['steps']} steps, grad clip {cfg['grad_clip']}, seed {cfg['seed']}.",
        *rows_lines(record),
        pos_embed_line(cfg),
        curriculum_line(cfg),
        *previous_run_lines(record),
        f"- Training took {record['train_seconds'] / 60:.1f} min ({record['steps_per_second']:.2f} steps/s) "
        f"on {record['machine']}; final training loss {record['final_loss']:.4f}.",
        "",
        f"## Held-out accuracy (exact match, greedy, {record['eval']['scenes']} fresh scenes, every question of each)",
        "",
        "| questions | fp32 (trained weights) | " + record["eval"]["saved_label"] + " |",
        "| --- | --- | --- |",
    ]
    fp32, saved = record["eval"]["fp32"], record["eval"]["saved"]
    for key in [k for k in (*shapes.QUESTION_TYPES, "1_object", "2_object", "all") if k in fp32]:
        lines.append(f"| {key} | {fp32[key]['accuracy'] * 100:.1f}% ({fp32[key]['correct']}/{fp32[key]['total']}) | "
                     f"{saved[key]['accuracy'] * 100:.1f}% ({saved[key]['correct']}/{saved[key]['total']}) |")
    lines += ["", "Through the ONNX pipeline: `qwen3vl-lab eval-shapes --model_dir OUT` after `make-tiny --trained` and `export`.", ""]
    return "\n".join(lines)


def rows_lines(record: dict) -> list[str]:
    cfg = record["config"]
    if not cfg.get("task_rows"):
        return [f"- Sampled softmax: the {record['task_tokens']} answer token rows + {cfg['negatives']} uniformly drawn "
                "other rows per step, logQ-corrected. The saved model is an ordinary full-vocabulary checkpoint."]
    return [f"- Sampled softmax: every step scores the {record['task_tokens']} rows of the task's tokens (prompts and "
            f"answers) + {cfg['negatives']} uniformly drawn other rows, logQ-corrected.",
            f"- Only those {record['task_tokens']} embedding rows train; the other {151936 - record['task_tokens']:,} keep "
            "their initial values (std 0.02). The saved model is an ordinary full-vocabulary checkpoint."]


def pos_embed_line(cfg: dict) -> str:
    std = cfg.get("pos_embed_std")
    if cfg.get("init_from"):
        return "- Weights continue the previous run's (no fresh initialisation)."
    if std is None:
        return "- Initialisation: transformers' own (vision position embedding std 0.02)."
    kind = "a 2-D sine-cosine code" if cfg.get("pos_embed_init") == "sincos" else "random rows"
    return (f"- Initialisation: transformers' own, except the vision position embedding: {kind} at std {std:g} "
            "(transformers: 0.02, at which an object's image token carries no linear trace of its cell).")


def curriculum_line(cfg: dict) -> str:
    if cfg["stage3_at"] <= 0:
        line = "- Curriculum: one- or two-object scenes, every question type, from the first step"
    else:
        line = (f"- Curriculum: colour questions on one object until step {int(cfg['stage2_at'] * cfg['steps'])}, all "
                f"questions on one object until step {int(cfg['stage3_at'] * cfg['steps'])}, then one or two objects")
    if cfg.get("focus"):
        line += f"; {cfg['focus']:.0%} of those examples are two-object colour/position questions"
    return line + "."


def command_flags(cfg: dict) -> str:
    """The train-shapes options that differ from the defaults."""
    default = asdict(TrainConfig())
    flags = []
    for key in ("seed", "steps", "lr", "stage2_at", "stage3_at", "focus", "batch_size", "negatives", "dtype",
                "pos_embed_std", "pos_embed_init", "threads", "eval_n"):
        if key in cfg and cfg[key] != default[key] and not (key.startswith("pos_embed") and cfg.get("init_from")):
            flags.append(f"--{key} {cfg[key]}")
    if not cfg.get("task_rows"):
        flags.append("--all_rows")
    return " ".join(flags)


def retrain_commands(record: dict) -> list[str]:
    """The command lines that reproduce this run (and the run it continued), indented as a code block."""
    chain = []
    while record:
        chain.append(record["config"])
        record = record.get("previous")
    chain.reverse()
    lines = []
    for i, cfg in enumerate(chain):
        init = f" --init_from runs/shapes-{i}" if i else ""
        ship = " --ship" if i == len(chain) - 1 else ""
        parts = [f"qwen3vl-lab train-shapes --output_dir runs/shapes-{i + 1}{init}", command_flags(cfg), ship.strip()]
        lines.append("    " + " ".join(part for part in parts if part))
    return lines


def previous_run_lines(record: dict) -> list[str]:
    """One line per earlier run this one continued (--init_from), oldest first, from their training.json."""
    chain = []
    prev = record.get("previous")
    while prev:
        chain.append(prev)
        prev = prev.get("previous")
    lines = []
    for i, run in enumerate(reversed(chain)):
        c, acc = run["config"], run["eval"]["saved"]
        start = "from scratch" if i == 0 else f"continuing run {i}"
        focus = f", focus {c['focus']}" if c.get("focus") else ""
        lines.append(f"- Run {i + 1} (runs/shapes-{i + 1}): {c['steps']} steps {start} (seed {c['seed']}, lr {c['lr']}{focus}, "
                     f"{run['train_seconds'] / 60:.1f} min); held-out accuracy {acc['all']['accuracy'] * 100:.1f}% "
                     f"(1 object {acc['1_object']['accuracy'] * 100:.1f}%, 2 objects {acc['2_object']['accuracy'] * 100:.1f}%).")
    if lines:
        lines.append(f"- Run {len(lines) + 1}, this one: the recipe above.")
    return lines


def load_saved(folder: Path):
    """The written checkpoint, as transformers loads it (weights upcast to float32)."""
    import torch  # noqa: PLC0415 (torch: the optional [train] extra)
    from transformers import Qwen3VLForConditionalGeneration  # noqa: PLC0415 (torch: the optional [train] extra)

    return Qwen3VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code=False, use_safetensors=True).eval()


# ------------------------------------------------------------------------------------- main
def train(cfg: TrainConfig, output_dir: Path, ship: bool = False, progress: bool = True) -> dict:
    import torch  # noqa: PLC0415 (torch: the optional [train] extra)

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    tokenizer = load_tokenizer()

    encoder = Encoder(tokenizer, ImageProcessorConfig.from_dict(preprocessor_config(PRESET)))
    task_ids = task_row_ids(encoder) if cfg.task_rows else task_token_ids(encoder)
    model = build_model(cfg.seed, cfg.pos_embed_std, cfg.pos_embed_init) if cfg.init_from is None else load_saved(Path(cfg.init_from))
    task_rows = TaskRows(model, task_ids) if cfg.task_rows else None
    model.train()
    optimizer = make_optimizer(model, cfg)
    loss_fn = SampledSoftmax(task_ids, model.config.text_config.vocab_size, cfg.negatives, cfg.seed)
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="train-shapes", unit="step", disable=not progress, mininterval=2.0)
    for step in bar:
        batch = make_batch(encoder, cfg, step)
        loss, acc = train_step(model, optimizer, loss_fn, batch, lr_at(step, cfg), cfg.grad_clip)
        losses.append(loss)
        if step % 20 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", acc=f"{acc:.2f}", stage=STAGES.index(stage_of(step, cfg)) + 1)
    bar.close()
    seconds = time.perf_counter() - t0
    if task_rows is not None:
        model = task_rows.restore()
    print(f"trained {cfg.steps} steps in {seconds / 60:.1f} min ({cfg.steps / seconds:.2f} steps/s)", flush=True)

    fp32_table, _ = evaluate(model, encoder, cfg.eval_n, cfg.eval_seed)
    print("held-out accuracy, fp32 (trained weights):\n" + shapes.format_table(fp32_table), flush=True)
    record = {
        "task": "shapes (qwen3vl_lab/shapes.py)",
        "config": asdict(cfg),
        "task_tokens": int(len(task_ids)),
        "train_seconds": round(seconds, 1),
        "steps_per_second": round(cfg.steps / seconds, 3),
        "final_loss": float(np.mean(losses[-100:])),
        "machine": f"{platform.machine()}, {cfg.threads} torch thread{'s' if cfg.threads > 1 else ''}, torch {torch.__version__}",
        "eval": {"scenes": cfg.eval_n, "seed": cfg.eval_seed, "fp32": fp32_table},
    }
    if cfg.init_from is not None and (Path(cfg.init_from) / "training.json").is_file():
        record["previous"] = json.loads((Path(cfg.init_from) / "training.json").read_text(encoding="utf-8"))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(output_dir.parent, f".{output_dir.name}.tmp-", shown=output_dir) as tmp:
        record["eval"]["saved"], record["eval"]["saved_label"] = fp32_table, f"{cfg.dtype} (as saved)"
        write_checkpoint(model, tmp, cfg, record)
        saved_table, _ = evaluate(load_saved(tmp), encoder, cfg.eval_n, cfg.eval_seed)
        print(f"held-out accuracy, the saved {cfg.dtype} checkpoint:\n" + shapes.format_table(saved_table), flush=True)
        record["eval"]["saved"] = saved_table
        write_checkpoint(model, tmp, cfg, record)  # again, with the saved model's accuracy in the record
        replace_folder(tmp, output_dir, what="train-shapes checkpoint", legacy=TRAINED_OUTPUT)
    print(f"wrote {output_dir}", flush=True)
    if ship:
        ship_checkpoint(output_dir)
    return record


def ship_checkpoint(folder: Path) -> Path:
    """Copy a trained folder's files (not the tokenizer, which ships once) into qwen3vl_lab/data/shapes_model."""

    dest = Path(str(trained_model_dir()))
    dest.mkdir(parents=True, exist_ok=True)
    for name in TRAINED_FILES:
        shutil.copy2(folder / name, dest / name)
    print(f"shipped to {dest}", flush=True)
    return dest


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--output_dir", required=True, help="folder for the trained checkpoint")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--negatives", type=int, default=d.negatives, help="sampled other vocabulary rows per step")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    p.add_argument("--eval_n", type=int, default=d.eval_n, help="held-out scenes evaluated at the end")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"], help="saved weight dtype")
    p.add_argument("--stage2_at", type=float, default=d.stage2_at,
                   help="fraction of the steps after which all question types come (one object)")
    p.add_argument("--stage3_at", type=float, default=d.stage3_at,
                   help="fraction of the steps after which scenes have one or two objects")
    p.add_argument("--focus", type=float, default=d.focus,
                   help=f"share of stage-3 examples that are two-object colour/position questions (default {d.focus})")
    p.add_argument("--pos_embed_std", type=float, default=d.pos_embed_std,
                   help="re-draw the vision position embedding at this std (default: transformers' 0.02; fresh runs only)")
    p.add_argument("--pos_embed_init", default=d.pos_embed_init, choices=["normal", "sincos"],
                   help="how the vision position embedding starts: random rows or a 2-D sine-cosine code")
    p.add_argument("--all_rows", action="store_true",
                   help="train all 151936 embedding rows (~1.4x slower steps), not only the task's tokens' rows")
    p.add_argument("--init_from", default=None, help="continue training this checkpoint folder (a previous output)")
    p.add_argument("--ship", action="store_true", help="also copy the result into qwen3vl_lab/data/shapes_model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(a) -> int:
    for name in ("steps", "batch_size", "negatives", "threads", "eval_n"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(a, name)}")
    if a.seed < 0:
        raise UserError(f"--seed must be >= 0, got {a.seed}")
    for name in ("lr", "pos_embed_std"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be > 0, got {value}")
    output_dir = checked_output_dir(a.output_dir, "--output_dir")
    check_replaceable(output_dir, legacy=TRAINED_OUTPUT)  # before training, not after it
    # Sleeping, not spinning, OpenMP threads: on a shared machine spinning threads make a step ~7x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch  # noqa: F401, PLC0415 (torch: the optional [train] extra)
    except ImportError:
        raise UserError("training needs torch: pip install -e '.[train]'") from None
    cfg = TrainConfig(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, negatives=a.negatives,
                      threads=a.threads, eval_n=a.eval_n, dtype=a.dtype, stage2_at=a.stage2_at,
                      stage3_at=a.stage3_at, init_from=a.init_from, focus=a.focus,
                      pos_embed_std=a.pos_embed_std, pos_embed_init=a.pos_embed_init, task_rows=not a.all_rows)
    if a.init_from is not None and not (Path(a.init_from) / "config.json").is_file():
        raise UserError(f"--init_from {a.init_from} is not a checkpoint folder; pass a previous --output_dir")
    train(cfg, output_dir, ship=a.ship, progress=not a.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m qwen3vl_lab.shapes.train", description=__doc__.splitlines()[0])
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        return run(a)
    except UserError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
