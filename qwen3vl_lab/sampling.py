"""Next-token choice: repetition penalty, temperature, top-k, top-p, then a draw. NumPy only.

Same semantics, in the same order, as transformers' `generate()` (generation/utils.py,
`_get_logits_processor`; the classes in generation/logits_process.py):

    logits (B, V) -> float32
      -> RepetitionPenaltyLogitsProcessor  (also in greedy mode; once per distinct previous id)
      -> greedy? argmax (first index among ties)
      -> TemperatureLogitsWarper            scores / temperature
      -> TopKLogitsWarper                   keep scores >= the k-th largest (ties with it are all kept)
      -> TopPLogitsWarper                   drop the low tail whose total probability <= 1 - top_p
      -> softmax -> one draw per row

min_tokens_to_keep is 1 (generate() uses 1 unless beam search): the most likely token always survives.
One documented difference: transformers' top-p sorts with torch.sort (not stable), so when tokens tied
on the boundary logit straddle the cut it drops an arbitrary subset of them; here all of them are kept.

A sampler is any callable `(logits (B, V), previous_ids) -> (B,) ids` (`SamplerFn`): `greedy`, a
`Sampler` (a `SamplingConfig` with its own random stream) or your own; `make_sampler` accepts either
a callable or a `SamplingConfig`. The generation loop (generate.py) takes any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import UserError

SamplerFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]  # THE sampler type: (logits (B, V), previous ids) -> (B,)


def greedy(logits: np.ndarray, previous_ids=None) -> np.ndarray:
    """The simplest sampler: the most likely token of each row (the first among ties). (B, V) -> (B,) int64."""
    return np.argmax(logits, axis=-1).astype(np.int64)


def forced(tokens) -> SamplerFn:
    """Teacher forcing as a sampler: the n-th call returns tokens[n] for every row, whatever the logits
    (then the argmax, once the tokens run out). The generation loop then feeds a known continuation."""
    tokens = [int(t) for t in tokens]
    calls = iter(range(1 << 62))

    def forced_sampler(logits, previous_ids=None) -> np.ndarray:
        n = next(calls)
        if n >= len(tokens):
            return greedy(logits)
        return np.full(np.shape(logits)[0], tokens[n], np.int64)

    return forced_sampler


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Defaults: Qwen3-VL Instruct's generation_config."""

    temperature: float = 0.7  # 0.0 = greedy
    top_k: int = 20  # 0 disables
    top_p: float = 0.8  # 1.0 disables
    no_sample: bool = False  # True = greedy (argmax), whatever the other knobs say
    repetition_penalty: float = 1.0  # 1.0 disables; > 1 discourages repeats, < 1 encourages them
    seed: int | None = None  # None = fresh entropy each run

    @property
    def greedy(self) -> bool:
        """Argmax decoding: `no_sample` or `temperature == 0`."""
        return self.no_sample or self.temperature == 0.0

    def validate(self) -> "SamplingConfig":
        """Raise a one-line UserError for an impossible setting; return self so it can be chained."""
        if not _is_number(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature={self.temperature} must be >= 0; use 0 for greedy, e.g. 0.7 to sample")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]; use 1.0 to disable it, e.g. 0.8")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be a whole number >= 0; use 0 to disable it, e.g. 20")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty={self.repetition_penalty} must be > 0; use 1.0 to disable it")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise UserError(f"seed={self.seed!r} must be an int or None")
        return self


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _as_logits(logits) -> np.ndarray:
    """(B, V) float32, as transformers casts next-token logits to float32 before processing."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise UserError(
            f"logits must be (batch, vocab), got shape {logits.shape}; for prefill output use logits[:, -1]"
        )
    return logits.astype(np.float32, copy=True)


def _history_rows(previous_ids, batch: int) -> list[np.ndarray]:
    """previous_ids as one 1-D id array per batch row: (B, S), a list of B sequences, or (S,) when B == 1."""
    if isinstance(previous_ids, np.ndarray) and previous_ids.ndim == 2:
        rows = list(previous_ids)
    elif isinstance(previous_ids, (list, tuple)) and previous_ids and np.ndim(previous_ids[0]) == 1:
        rows = [np.asarray(r) for r in previous_ids]
    elif np.ndim(previous_ids) == 1 and batch == 1:
        rows = [np.asarray(previous_ids)]
    else:
        raise UserError(f"previous_ids must be (batch, seq) or one id sequence per row for batch {batch}")
    if len(rows) != batch:
        raise UserError(f"previous_ids has {len(rows)} rows but logits has {batch}; pass one history per row")
    return [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]


def apply_repetition_penalty(logits, previous_ids, penalty: float) -> np.ndarray:
    """Like transformers' RepetitionPenaltyLogitsProcessor: each previous id's logit, once, is
    multiplied by `penalty` when negative and divided by it otherwise.

    Ids outside [0, V) are ignored (transformers drops ids >= V the same way). Returns a new float32 (B, V).
    """
    scores = _as_logits(logits)  # (B, V)
    if previous_ids is None or penalty == 1.0:
        return scores
    vocab = scores.shape[1]
    penalty = np.float32(penalty)
    for row, ids in zip(scores, _history_rows(previous_ids, scores.shape[0])):
        ids = np.unique(ids[(ids >= 0) & (ids < vocab)])  # (U,) each id penalised once
        seen = row[ids]
        row[ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def _top_k_threshold(scores: np.ndarray, top_k: int) -> np.ndarray:
    """(B, 1) the k-th largest score per row; keeping scores >= it keeps every tie (TopKLogitsWarper)."""
    k = min(max(top_k, 1), scores.shape[1])
    return -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]


def _softmax(x: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis; -inf entries get probability 0."""
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def _top_p_threshold(scores: np.ndarray, top_p: float) -> np.ndarray:
    """(B, 1) the smallest score top-p keeps (TopPLogitsWarper, min_tokens_to_keep=1).

    Sort ascending, drop the prefix whose cumulative probability is <= 1 - top_p, always keep the last.
    float32 probabilities, cumsum accumulated in float64 and rounded to float32 (what torch does on CPU).
    """
    ascending = np.sort(scores, axis=1)  # (B, V)
    cum = np.cumsum(_softmax(ascending), axis=1, dtype=np.float64).astype(np.float32)
    removed = cum <= np.float32(1 - top_p)
    removed[:, -1] = False
    first_kept = removed.sum(axis=1)  # removed is a prefix because cum never decreases
    return np.take_along_axis(ascending, first_kept[:, None], axis=1)


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Temperature, then top-k, then top-p (generate()'s order); filtered scores become -inf. (B, V) float32.

    temperature 0 means greedy: everything but the first argmax becomes -inf.
    """
    scores = _as_logits(logits)  # (B, V)
    if temperature == 0:
        keep = np.zeros(scores.shape, dtype=bool)
        keep[np.arange(len(scores)), scores.argmax(axis=1)] = True
        return np.where(keep, scores, -np.inf).astype(np.float32)
    if temperature != 1.0:
        scores = scores / np.float32(temperature)
    if top_k > 0:
        scores = np.where(scores < _top_k_threshold(scores, top_k), -np.inf, scores).astype(np.float32)
    if top_p < 1.0:
        scores = np.where(scores < _top_p_threshold(scores, top_p), -np.inf, scores).astype(np.float32)
    return scores


def logits_to_probs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution a sample is drawn from: softmax(filter_logits(...)), (B, V) float32, rows sum to 1."""
    return _softmax(filter_logits(logits, temperature, top_k, top_p))


def draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from (B, V) probabilities by inverse CDF (one uniform per row). (B,) int64."""
    cdf = np.cumsum(probs, axis=1, dtype=np.float64)  # (B, V)
    u = rng.random(len(probs)) * cdf[:, -1]  # (B,) in [0, total)
    ids = (cdf <= u[:, None]).sum(axis=1)  # first index whose cdf exceeds u: never a zero-probability id
    last_nonzero = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)  # guard against rounding at the top
    return np.minimum(ids, last_nonzero).astype(np.int64)


def sample(logits, config: SamplingConfig, rng: np.random.Generator, previous_ids=None) -> np.ndarray:
    """Next token per row: (B, V) logits -> (B,) int64 ids, following `config` (see the module docstring)."""
    scores = apply_repetition_penalty(logits, previous_ids, config.repetition_penalty)  # (B, V)
    if config.greedy:
        return scores.argmax(axis=1).astype(np.int64)
    probs = logits_to_probs(scores, config.temperature, config.top_k, config.top_p)  # (B, V)
    return draw(probs, rng)


class Sampler:
    """A `SamplingConfig` plus its own `np.random.Generator` seeded from `config.seed`, so runs reproduce.

    Call it like any custom sampler: `sampler(logits (B, V), previous_ids) -> (B,) int64`.
    """

    def __init__(self, config: SamplingConfig | None = None):
        self.config = (config or SamplingConfig()).validate()
        self.reset()

    def reset(self) -> None:
        """Restart the random stream from the seed (a fresh random stream when seed is None)."""
        self.rng = np.random.default_rng(self.config.seed)

    def __call__(self, logits, previous_ids=None) -> np.ndarray:
        return sample(logits, self.config, self.rng, previous_ids)

    def __repr__(self) -> str:
        return f"Sampler({self.config})"


def _checked(fn: Callable) -> SamplerFn:
    """Wrap a custom sampler so its answer is always (B,) int64, with a clear error otherwise."""

    def custom_sampler(logits, previous_ids=None) -> np.ndarray:
        ids = np.asarray(fn(logits, previous_ids)).reshape(-1)
        batch = np.shape(logits)[0]
        if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(
                f"the custom sampler returned {ids.dtype} of shape {ids.shape}; it must return {batch} integer ids"
            )
        vocab = np.shape(logits)[-1]
        outside = ids[(ids < 0) | (ids >= vocab)]
        if outside.size:
            raise UserError(f"the custom sampler returned id {int(outside[0])}, outside the vocabulary [0, {vocab}); "
                            "it must return indices into the last axis of logits")
        return ids.astype(np.int64)

    custom_sampler.__wrapped__ = fn
    return custom_sampler


def make_sampler(config_or_callable: SamplingConfig | Callable | None = None) -> SamplerFn:
    """A callable `(logits (B, V), previous_ids) -> (B,) int64` from a SamplingConfig, a callable, or None."""
    if config_or_callable is None or isinstance(config_or_callable, SamplingConfig):
        return Sampler(config_or_callable)
    if isinstance(config_or_callable, Sampler):
        return config_or_callable
    if callable(config_or_callable):
        return _checked(config_or_callable)
    raise UserError(
        f"cannot sample with {type(config_or_callable).__name__}; "
        "pass a SamplingConfig or a function (logits, previous_ids) -> ids"
    )
