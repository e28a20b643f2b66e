"""Two decoders on the same tokens: how far apart are their next-token distributions, step by step?

    ref, test = as_model("OUT", "fp32"), as_model("OUT", "int4")
    tf = teacher_forced(ref, test, "Write a haiku about the sea.", n_steps=16)
    tf.kl, tf.top1_agree, tf.ref_rank, tf.entropy_ref, tf.entropy_test      # (T,) arrays, one per step
    run = free_greedy(ref, test, "Write a haiku about the sea.")            # run.first_divergence
    cmp = compare(ref, test, prompts)                                       # all prompts; print(cmp.table())

Teacher forcing: both models prefill the same prompt, then at every step both are fed the
reference's greedy token, so step t of both sees exactly the same context. The metrics at step t:
- `kl`: KL(P_ref || P_test) in nats (0 = identical distributions);
- `top1_agree`: the test's argmax is the reference's argmax;
- `ref_rank`: the rank of the reference's token under the test (0 = also its top choice);
- `entropy_ref` / `entropy_test`: nats (flat logits, the "garbled" symptom, approach ln V);
- `max_abs_diff`: largest |logit difference|; `top5_overlap`: shared top-5 tokens / 5.
Free greedy: each model generates on its own; `first_divergence` is the first step where they differ.

The reference runs first and alone: one greedy run records its tokens and its logits at every step
(record.py), which are all teacher forcing and free greedy need from it; then the test model runs
against that record. Given folders, the reference is released before the test model is loaded, so
two large decoders are never in memory at once (`compare_recorded` takes a saved record).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from ..generate import Prompt, generate_tokens
from ..layouts import find_layout
from ..model import Model
from ..signals import interruption_point
from ..steps import decode_step, prefill
from .inputs import PromptLike, as_model, as_specs, prepare
from .record import RecordedPrompt, RecordFolder, record_reference


# -- metrics on logits (pure numpy) --------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., V) -> log probabilities, in float64."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P_test) over the last axis, in nats: the extra surprise of the test model on the reference's samples."""
    lp, lq = log_softmax(ref_logits), log_softmax(test_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def entropy(logits: np.ndarray) -> np.ndarray:
    lp = log_softmax(logits)
    return -(np.exp(lp) * lp).sum(axis=-1)


def rank_of(logits: np.ndarray, token: int) -> int:
    """How many tokens score strictly higher than `token` (0 = it is the argmax)."""
    logits = np.asarray(logits)
    return int((logits > logits[token]).sum())


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int = 5) -> float:
    ta = np.argpartition(-np.asarray(a), k)[:k]
    tb = np.argpartition(-np.asarray(b), k)[:k]
    return len(set(ta.tolist()) & set(tb.tolist())) / k


# -- result objects ------------------------------------------------------------------------------
@dataclass
class TeacherForced:
    """Per-step metrics of one prompt; every array has one entry per generated step (T,)."""

    label: str
    prompt_length: int
    tokens: np.ndarray  # (T,) the reference's greedy tokens, fed to both models
    test_tokens: np.ndarray  # (T,) the test model's argmax at each step
    kl: np.ndarray  # (T,) KL(P_ref || P_test), nats
    top1_agree: np.ndarray  # (T,) bool
    ref_rank: np.ndarray  # (T,) rank of the reference token under the test model (0 = top)
    entropy_ref: np.ndarray  # (T,) nats
    entropy_test: np.ndarray  # (T,) nats
    max_abs_diff: np.ndarray  # (T,) max |logit_ref - logit_test|
    top5_overlap: np.ndarray  # (T,) fraction of shared top-5 tokens

    @property
    def steps(self) -> np.ndarray:
        return np.arange(len(self.tokens))

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean()) if len(self.kl) else 0.0

    @property
    def agreement(self) -> float:
        return float(self.top1_agree.mean()) if len(self.top1_agree) else 1.0

    @property
    def first_disagreement(self) -> int | None:
        bad = np.flatnonzero(~self.top1_agree)
        return int(bad[0]) if len(bad) else None

    def summary(self) -> dict:
        return {"prompt": self.label, "steps": len(self.tokens), "mean_kl": self.mean_kl,
                "max_kl": float(self.kl.max()) if len(self.kl) else 0.0, "top1_agreement": self.agreement,
                "mean_ref_rank": float(self.ref_rank.mean()) if len(self.ref_rank) else 0.0,
                "first_disagreement": self.first_disagreement,
                "entropy_ref": float(self.entropy_ref.mean()) if len(self.kl) else 0.0,
                "entropy_test": float(self.entropy_test.mean()) if len(self.kl) else 0.0}


@dataclass
class FreeRun:
    """Each model generating greedily on its own from the same prompt."""

    label: str
    ref_tokens: np.ndarray  # (T_ref,)
    test_tokens: np.ndarray  # (T_test,)
    first_divergence: int | None  # first step where the tokens differ (None: identical)
    ref_text: str = ""
    test_text: str = ""


@dataclass
class Comparison:
    """All prompts of one reference/test pair."""

    reference: str
    test: str
    forced: list[TeacherForced]
    free: list[FreeRun] = field(default_factory=list)

    @property
    def kl(self) -> np.ndarray:
        """(sum T,) every step of every prompt, pooled."""
        return np.concatenate([f.kl for f in self.forced]) if self.forced else np.zeros(0)

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean()) if len(self.kl) else 0.0

    @property
    def agreement(self) -> float:
        agree = np.concatenate([f.top1_agree for f in self.forced]) if self.forced else np.zeros(0, bool)
        return float(agree.mean()) if len(agree) else 1.0

    @property
    def mean_ref_rank(self) -> float:
        ranks = np.concatenate([f.ref_rank for f in self.forced]) if self.forced else np.zeros(0)
        return float(ranks.mean()) if len(ranks) else 0.0

    @property
    def first_divergences(self) -> list[int | None]:
        return [r.first_divergence for r in self.free]

    def summary(self) -> dict:
        return {"reference": self.reference, "test": self.test, "mean_kl": self.mean_kl,
                "top1_agreement": self.agreement, "mean_ref_rank": self.mean_ref_rank,
                "first_divergence": self.first_divergences}

    def to_dict(self) -> dict:
        """Plain JSON (lists and numbers): what a sweep caches and a worker sends back."""
        return {"reference": self.reference, "test": self.test,
                "forced": [{k: _plain(v) for k, v in vars(f).items()} for f in self.forced],
                "free": [{k: _plain(v) for k, v in vars(r).items()} for r in self.free]}

    @classmethod
    def from_dict(cls, d: dict) -> "Comparison":
        forced = [TeacherForced(**{k: np.asarray(v, _FORCED_DTYPES[k]) if k in _FORCED_DTYPES else v
                                   for k, v in f.items()}) for f in d["forced"]]
        free = [FreeRun(**{k: np.asarray(v, np.int64) if k in ("ref_tokens", "test_tokens") else v
                           for k, v in r.items()}) for r in d["free"]]
        return cls(d["reference"], d["test"], forced, free)

    def table(self) -> str:
        """A plain-text table, one row per prompt."""
        head = f"{'prompt':36s} {'steps':>5s} {'mean KL':>9s} {'max KL':>9s} {'top-1':>6s} {'rank':>6s} " \
               f"{'H ref':>6s} {'H test':>6s} {'diverge':>7s}"
        lines = [head, "-" * len(head)]
        free = {r.label: r for r in self.free}
        for f in self.forced:
            s = f.summary()
            div = free[f.label].first_divergence if f.label in free else None
            div_s = "-" if f.label not in free else ("never" if div is None else str(div))
            lines.append(f"{f.label[:36]:36s} {s['steps']:5d} {s['mean_kl']:9.4f} {s['max_kl']:9.4f} "
                         f"{s['top1_agreement']:6.0%} {s['mean_ref_rank']:6.1f} {s['entropy_ref']:6.2f} "
                         f"{s['entropy_test']:6.2f} {div_s:>7s}")
        lines.append(f"{'all prompts':36s} {len(self.kl):5d} {self.mean_kl:9.4f} "
                     f"{(self.kl.max() if len(self.kl) else 0):9.4f} {self.agreement:6.0%} {self.mean_ref_rank:6.1f}")
        return "\n".join(lines)


_FORCED_DTYPES = {"tokens": np.int64, "test_tokens": np.int64, "kl": np.float64, "top1_agree": bool,
                  "ref_rank": np.int64, "entropy_ref": np.float64, "entropy_test": np.float64,
                  "max_abs_diff": np.float64, "top5_overlap": np.float64}


def _plain(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


# -- running -------------------------------------------------------------------------------------
def _step_metrics(ref_logits: np.ndarray, test_logits: np.ndarray) -> dict:
    token = int(np.argmax(ref_logits))
    return {"token": token, "test_token": int(np.argmax(test_logits)),
            "kl": float(kl_divergence(ref_logits, test_logits)), "rank": rank_of(test_logits, token),
            "h_ref": float(entropy(ref_logits)), "h_test": float(entropy(test_logits)),
            "max_abs": float(np.abs(ref_logits.astype(np.float64) - test_logits).max()),
            "top5": topk_overlap(ref_logits, test_logits, 5)}


def _same_prompt(rec: RecordedPrompt, p: Prompt) -> None:
    if rec.input_ids.shape != p.input_ids.shape or not np.array_equal(rec.input_ids, p.input_ids):
        raise UserError("the two models turn the prompt into different token ids (different tokenizers or image "
                        "settings); compare folders exported from the same checkpoint")


def forced_against(rec: RecordedPrompt, test: Model, prompt: PromptLike) -> TeacherForced:
    """The test model fed the recorded reference tokens, step by step, scored against the recorded logits."""
    spec = as_specs(prompt)[0]
    p = prepare(test, spec)
    _same_prompt(rec, p)
    rows = []
    step = prefill(test, p.inputs_embeds, p.positions, attention_mask=p.attention_mask, deepstack=p.deepstack,
                   input_ids=p.input_ids)
    for t, token in enumerate(rec.tokens):
        rows.append(_step_metrics(rec.logits[t], step.logits[0]))  # (V,) each
        if t + 1 < len(rec.tokens):
            step = decode_step(test, np.array([[token]], np.int64), step.cache, p.positions.rope_deltas)

    def col(key, dtype):
        return np.array([r[key] for r in rows], dtype)

    return TeacherForced(rec.label, rec.prompt_length, col("token", np.int64), col("test_token", np.int64),
                         col("kl", np.float64), col("token", np.int64) == col("test_token", np.int64),
                         col("rank", np.int64), col("h_ref", np.float64), col("h_test", np.float64),
                         col("max_abs", np.float64), col("top5", np.float64))


def _argmax(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=-1)


def free_against(rec: RecordedPrompt, test: Model, prompt: PromptLike, n_steps: int = 16, *,
                 stop_at_eos: bool = True, decode_text: bool = True) -> FreeRun:
    """The test model generating greedily on its own, against the reference's recorded greedy run."""
    spec = as_specs(prompt)[0]
    p = prepare(test, spec)
    _same_prompt(rec, p)
    eos = None if stop_at_eos else []
    a = rec.tokens
    b = np.array(list(generate_tokens(test, p, _argmax, n_steps, eos_token_ids=eos)), np.int64)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    first = int(differ[0]) if len(differ) else (None if len(a) == len(b) else n)
    test_text = test.tokenizer.decode(b.tolist(), skip_special_tokens=True) if decode_text else ""
    return FreeRun(rec.label, a, b, first, rec.text if decode_text else "", test_text)


def teacher_forced(ref: Model | str, test: Model | str, prompt: PromptLike, n_steps: int = 16, *,
                   stop_at_eos: bool = True) -> TeacherForced:
    """Prefill both models on `prompt`, then feed both the reference's greedy token for `n_steps` steps.

    The reference runs first (its greedy tokens and logits are recorded, record.py), then the test model
    runs against the record; a reference given as a folder is released before the test model loads."""
    spec = as_specs(prompt)[0]
    rec = record_reference(ref, [spec], n_steps, stop_at_eos=stop_at_eos)[0]
    return forced_against(rec, as_model(test), spec)


def free_greedy(ref: Model | str, test: Model | str, prompt: PromptLike, n_steps: int = 16, *,
                stop_at_eos: bool = True, decode_text: bool = True) -> FreeRun:
    """Both models generate greedily on their own; where do their token streams part?"""
    spec = as_specs(prompt)[0]
    rec = record_reference(ref, [spec], n_steps, stop_at_eos=stop_at_eos)[0]
    return free_against(rec, as_model(test), spec, n_steps, stop_at_eos=stop_at_eos, decode_text=decode_text)


def compare_recorded(records: Sequence[RecordedPrompt] | RecordFolder, test: Model | str,
                     prompts: Sequence[PromptLike], n_steps: int = 16, *, free: bool = True,
                     progress: bool = False, reference: str = "") -> Comparison:
    """The test model against a recorded reference (`record.record_reference`), prompt by prompt.

    `records` may be a `RecordFolder` (a saved record): then one prompt's logits are read at a time."""
    test_m = as_model(test)
    specs = as_specs(prompts)
    if len(specs) != len(records):
        raise UserError(f"the record holds {len(records)} prompt(s) but {len(specs)} were given; record them again")
    forced, runs = [], []
    for i, spec in enumerate(tqdm(specs, desc="compare", unit="prompt", disable=not progress)):
        interruption_point()  # a cancelled sweep job stops between prompts (signals.py)
        rec = records[i]
        forced.append(forced_against(rec, test_m, spec))
        if free:
            runs.append(free_against(rec, test_m, spec, n_steps))
        del rec
    return Comparison(reference, str(test_m.folder), forced, runs)


def compare(ref: Model | str, test: Model | str, prompts: Sequence[PromptLike] | PromptLike | None = None,
            n_steps: int = 16, *, free: bool = True, image=None, image_size: int | None = None,
            progress: bool = False) -> Comparison:
    """Teacher-forced metrics (and free greedy divergence) for every prompt. Defaults: DEFAULT_PROMPTS.

    The reference runs first on every prompt (record.py), then the test model against the record: a
    reference given as a folder is released before the test model is loaded."""
    specs = as_specs(prompts, image, image_size)
    ref_name = str(ref.folder) if isinstance(ref, Model) else str(find_layout(ref, "fp32").folder)  # any layout
    records = record_reference(ref, specs, n_steps, progress=progress)
    return compare_recorded(records, test, specs, n_steps, free=free, progress=progress, reference=ref_name)


__all__ = ["Comparison", "FreeRun", "TeacherForced", "compare", "compare_recorded", "entropy", "forced_against",
           "free_against", "free_greedy", "kl_divergence", "log_softmax", "rank_of", "teacher_forced", "topk_overlap"]
