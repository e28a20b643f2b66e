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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..generate import generate_tokens
from ..model import Model
from ..sampling import greedy
from ..steps import decode_step, prefill
from .inputs import PromptLike, as_model, as_specs, label_of, prepare, same_tokens


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


# -- running -------------------------------------------------------------------------------------
def _step_metrics(ref_logits: np.ndarray, test_logits: np.ndarray) -> dict:
    token = int(np.argmax(ref_logits))
    return {"token": token, "test_token": int(np.argmax(test_logits)),
            "kl": float(kl_divergence(ref_logits, test_logits)), "rank": rank_of(test_logits, token),
            "h_ref": float(entropy(ref_logits)), "h_test": float(entropy(test_logits)),
            "max_abs": float(np.abs(ref_logits.astype(np.float64) - test_logits).max()),
            "top5": topk_overlap(ref_logits, test_logits, 5)}


def teacher_forced(ref: Model | str, test: Model | str, prompt: PromptLike, n_steps: int = 16, *,
                   stop_at_eos: bool = True) -> TeacherForced:
    """Prefill both models on `prompt`, then feed both the reference's greedy token for `n_steps` steps."""
    ref, test = as_model(ref), as_model(test)
    spec = as_specs(prompt)[0]
    p_ref, p_test = prepare(ref, spec), prepare(test, spec)
    same_tokens(p_ref, p_test)
    eos = set(ref.config.eos_token_ids) if stop_at_eos else set()
    s_ref = prefill(ref, p_ref.inputs_embeds, p_ref.positions, attention_mask=p_ref.attention_mask,
                    deepstack=p_ref.deepstack)
    s_test = prefill(test, p_test.inputs_embeds, p_test.positions, attention_mask=p_test.attention_mask,
                     deepstack=p_test.deepstack)
    rows = []
    budget = min(n_steps, ref.context_length - p_ref.length)
    for t in range(budget):
        m = _step_metrics(s_ref.logits[0], s_test.logits[0])  # (V,) each
        rows.append(m)
        if m["token"] in eos or t + 1 == budget:
            break
        token = np.array([[m["token"]]], np.int64)  # (1, 1): the same token for both
        s_ref = decode_step(ref, token, s_ref.cache, p_ref.positions.rope_deltas)
        s_test = decode_step(test, token, s_test.cache, p_test.positions.rope_deltas)

    def col(key, dtype):
        return np.array([r[key] for r in rows], dtype)

    return TeacherForced(label_of(spec), p_ref.length, col("token", np.int64), col("test_token", np.int64),
                         col("kl", np.float64), col("token", np.int64) == col("test_token", np.int64),
                         col("rank", np.int64), col("h_ref", np.float64), col("h_test", np.float64),
                         col("max_abs", np.float64), col("top5", np.float64))


def free_greedy(ref: Model | str, test: Model | str, prompt: PromptLike, n_steps: int = 16, *,
                stop_at_eos: bool = True, decode_text: bool = True) -> FreeRun:
    """Both models generate greedily on their own; where do their token streams part?"""
    ref, test = as_model(ref), as_model(test)
    spec = as_specs(prompt)[0]
    p_ref, p_test = prepare(ref, spec), prepare(test, spec)
    same_tokens(p_ref, p_test)
    eos = None if stop_at_eos else []
    a = np.array(list(generate_tokens(ref, p_ref, greedy, n_steps, eos_token_ids=eos)), np.int64)
    b = np.array(list(generate_tokens(test, p_test, greedy, n_steps, eos_token_ids=eos)), np.int64)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    first = int(differ[0]) if len(differ) else (None if len(a) == len(b) else n)
    texts = ("", "")
    if decode_text:
        tok = ref.tokenizer
        texts = (tok.decode(a.tolist(), skip_special_tokens=True), tok.decode(b.tolist(), skip_special_tokens=True))
    return FreeRun(label_of(spec), a, b, first, *texts)


def compare(ref: Model | str, test: Model | str, prompts: Sequence[PromptLike] | PromptLike | None = None,
            n_steps: int = 16, *, free: bool = True, image=None, image_size: int | None = None,
            progress: bool = False) -> Comparison:
    """Teacher-forced metrics (and free greedy divergence) for every prompt. Defaults: DEFAULT_PROMPTS."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    ref_m, test_m = as_model(ref), as_model(test)
    specs = as_specs(prompts, image, image_size)
    forced, runs = [], []
    for spec in tqdm(specs, desc="compare", unit="prompt", disable=not progress):
        forced.append(teacher_forced(ref_m, test_m, spec, n_steps))
        if free:
            runs.append(free_greedy(ref_m, test_m, spec, n_steps))
    return Comparison(str(ref_m.folder), str(test_m.folder), forced, runs)


__all__ = ["Comparison", "FreeRun", "TeacherForced", "compare", "entropy", "free_greedy", "kl_divergence",
           "log_softmax", "rank_of", "teacher_forced", "topk_overlap"]
