"""Notebook 07's exercise: the doctor's per-step number, KL(reference || test) of the next-token distributions.

    from qwen3vl_lab.apps.lessons import doctor_export as lesson
    lesson.check_kl_per_step(my_kl)     # where it differs, with a hint
    lesson.kl_per_step                  # the reference solution

kl_per_step(ref_logits (T, V), test_logits (T, V)) -> (T,) in nats: at each step, how many extra nats the test
model's distribution costs where the reference's puts its mass, sum_v p(v) (log p(v) - log q(v)), p = softmax of
the reference's logits, q = the test's. 0 when the two agree; it is not symmetric.
The check's oracle: cases whose KL is written out with Python's math on the probabilities (two-token and
three-token distributions, a shift of every logit, logits around 1000 where a naive exp overflows).
"""

from __future__ import annotations

import math

import numpy as np

from .grading import first_difference, graded, mismatch


# -- the reference solution ------------------------------------------------------------------------
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)  # stable: the largest logit becomes 0, exp never overflows
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_per_step(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """(T, V), (T, V) -> (T,) KL(softmax(ref) || softmax(test)) in nats."""
    log_p, log_q = _log_softmax(ref_logits), _log_softmax(test_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


# -- cases written out by hand ---------------------------------------------------------------------
def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _logits(p: list[float], shift: float = 0.0) -> list[float]:
    return [math.log(x) + shift for x in p]


def _cases():
    p1, q1 = [0.9, 0.1], [0.6, 0.4]
    p2, q2 = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    p3, q3 = [0.7, 0.2, 0.1], [0.7, 0.2, 0.1]
    ref = np.array([_logits(p1 + [1e-9]), _logits(p2), _logits(p3)], np.float64)
    test = np.array([_logits(q1 + [1e-9], shift=3.0), _logits(q2), _logits(q3, shift=-7.0)], np.float64)
    want = np.array([_kl(p1, q1), _kl(p2, q2), 0.0])  # the 1e-9 third token changes nothing at 1e-6
    big = np.array([[1000.0, 998.0, 990.0]])
    pb = [math.exp(v - 1000) for v in big[0]]
    pb = [v / sum(pb) for v in pb]
    qb = [1 / 3] * 3
    return [("3 steps: a 2-token, a 3-token and an identical distribution (test logits shifted by a constant)",
             ref, test, want),
            ("logits around 1000 (a naive exp overflows)", big, np.zeros((1, 3)), np.array([_kl(pb, qb)]))]


def _hint(got: np.ndarray, ref: np.ndarray, test: np.ndarray) -> str:
    if not np.isfinite(got).all():
        return "exp(1000) overflows: subtract each row's largest logit before exponentiating (log-softmax)"
    if got.shape != (ref.shape[0],):
        return "one value per step: sum over the vocabulary (the last axis), not over the steps"
    if np.allclose(got, kl_per_step(test, ref), atol=1e-6):
        return "the two arguments are swapped: KL(reference || test) weights by the REFERENCE's probabilities p"
    if np.allclose(got, kl_per_step(ref, test) / math.log(2), atol=1e-6):
        return "that is bits (log base 2); the doctor reports nats (natural log)"
    if np.allclose(got, (ref - test).mean(axis=-1), atol=1e-6) or np.allclose(got, np.abs(ref - test).mean(-1), atol=1e-6):
        return "compare probabilities, not raw logits: logits shifted by a constant give the same distribution"
    return "softmax each row (stably), then sum p * (log p - log q) over the vocabulary"


def _run_cases(student_fn) -> None:
    for where, ref, test, want in _cases():
        got = np.asarray(student_fn(ref.copy(), test.copy()), np.float64)
        if got.shape != want.shape:
            raise mismatch(f"{where}: shape", got.shape, want.shape, _hint(got, ref, test))
        i = first_difference(got, want, atol=1e-6)
        if i is not None:
            raise mismatch(f"{where}: step {i}", got, want, _hint(got, ref, test))


def check_kl_per_step(student_fn) -> bool:
    """student_fn(ref_logits (T, V), test_logits (T, V)) -> (T,) KL in nats."""
    return graded("kl_per_step", student_fn, _run_cases)


__all__ = ["check_kl_per_step", "kl_per_step"]
