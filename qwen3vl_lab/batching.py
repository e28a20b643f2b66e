"""Measurements of batched decoding and long prefills, for `qwen3vl-lab bench` and notebooks.

Nothing here prints or asserts a speed: each function runs the ordinary generation code
(`generate.batch_steps`, `generate.run_prefill`) on synthetic prompts and returns what it measured.

    run = time_batched_decode(model, batch_size=4, prompt_tokens=64, new_tokens=32)
    run.tokens_per_second, run.tokens_per_second_per_sequence
    pre = time_prefill(model, prompt_tokens=4096, prefill_chunk=1024)
    pre.seconds, pre.peak_rss_mb        # peak RSS is per process: measure long prefills in a fresh one
    costs = decode_step_costs(model, cache_lengths=[1024, 2048, 4096, 8192])   # seconds per step vs T

Decoding greedily with no end-of-sequence token, every row makes exactly `new_tokens` tokens.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

from .generate import Prompt, batch_steps, pad_prompts, prepare_ids, run_prefill
from .model import Model
from .steps import decode_step

__all__ = ["DecodeRun", "PrefillRun", "StepCost", "synthetic_prompts", "time_batched_decode", "time_prefill",
           "decode_step_costs", "peak_rss_mb", "rss_mb"]


def _argmax(logits: np.ndarray, previous_ids=None) -> np.ndarray:
    return np.argmax(logits, axis=-1)  # (B,)


@dataclass(frozen=True)
class DecodeRun:
    batch_size: int
    prompt_tokens: list[int]  # real tokens per row
    new_tokens: int  # per row; the first comes from the prefill, the rest from decode steps
    prefill_seconds: float  # prefill + first sampling
    decode_seconds: float  # all decode steps (decoder call + sampling), new_tokens - 1 of them

    @property
    def decode_steps(self) -> int:
        return self.new_tokens - 1

    @property
    def seconds_per_step(self) -> float:
        return self.decode_seconds / max(self.decode_steps, 1)

    @property
    def tokens_per_second_per_sequence(self) -> float:
        """Decode speed one sequence sees."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds else float("nan")

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput of the whole batch."""
        return self.batch_size * self.tokens_per_second_per_sequence

    def to_json(self) -> dict:
        return {"batch_size": self.batch_size, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_seconds": round(self.prefill_seconds, 4), "decode_seconds": round(self.decode_seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 2),
                "tokens_per_second_per_sequence": round(self.tokens_per_second_per_sequence, 2)}


@dataclass(frozen=True)
class PrefillRun:
    prompt_tokens: int
    prefill_chunk: int | None
    seconds: float
    cache_bytes: int  # what the KV cache holds afterwards (= bytes_per_token x prompt_tokens)
    rss_before_mb: float | None
    rss_after_mb: float | None
    peak_rss_mb: float  # the process' high-water mark so far (includes anything run before)

    @property
    def tokens_per_second(self) -> float:
        return self.prompt_tokens / self.seconds

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "prefill_chunk": self.prefill_chunk,
                "seconds": round(self.seconds, 4), "tokens_per_second": round(self.tokens_per_second, 1),
                "cache_mb": round(self.cache_bytes / 2**20, 3), "peak_rss_mb": round(self.peak_rss_mb, 1)}


@dataclass(frozen=True)
class StepCost:
    cache_tokens: int  # T before the step
    seconds_per_step: float
    cache_bytes: int


def rss_mb() -> float | None:
    """Resident memory of this process now (Linux /proc), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """The process' peak resident memory so far (never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def synthetic_prompts(model: Model, batch_size: int, prompt_tokens: int, seed: int = 0,
                      ragged: bool = False) -> list[Prompt]:
    """Random ordinary-token prompts; ragged=True spreads the lengths over [prompt_tokens / 2, prompt_tokens]."""
    rng = np.random.default_rng(seed)
    lengths = (np.linspace(max(prompt_tokens // 2, 1), prompt_tokens, batch_size).astype(int) if ragged
               else [prompt_tokens] * batch_size)
    return [prepare_ids(model, rng.integers(0, 150000, (1, int(n)))) for n in lengths]


def time_batched_decode(model: Model, batch_size: int = 1, prompt_tokens: int = 64, new_tokens: int = 32,
                        prefill_chunk: int | None = None, seed: int = 0, ragged: bool = False,
                        prompts: list[Prompt] | None = None) -> DecodeRun:
    """One batched generation of `new_tokens` per row; times the prefill and the decode steps separately."""
    prompts = prompts or synthetic_prompts(model, batch_size, prompt_tokens, seed, ragged)
    batch = pad_prompts(model, prompts)
    t0 = time.perf_counter()
    steps = batch_steps(model, batch, _argmax, new_tokens, eos_token_ids=[], prefill_chunk=prefill_chunk)
    next(steps)  # prefill + the first token
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in steps)
    t2 = time.perf_counter()
    return DecodeRun(len(prompts), [p.length for p in prompts], n, t1 - t0, t2 - t1)


def time_prefill(model: Model, prompt_tokens: int, prefill_chunk: int | None = None, seed: int = 0) -> PrefillRun:
    """One prefill of a random `prompt_tokens`-token prompt (whole or chunked)."""
    prompt = synthetic_prompts(model, 1, prompt_tokens, seed)[0]
    before = rss_mb()
    t0 = time.perf_counter()
    step = run_prefill(model, prompt, prefill_chunk)
    seconds = time.perf_counter() - t0
    return PrefillRun(prompt_tokens, prefill_chunk, seconds, step.cache.nbytes, before, rss_mb(), peak_rss_mb())


def decode_step_costs(model: Model, cache_lengths=(1024, 2048, 4096, 8192), steps: int = 8,
                      prefill_chunk: int = 512, batch_size: int = 1, seed: int = 0) -> list[StepCost]:
    """Seconds per decode step at several cache lengths T (each step's concat copies T positions per layer)."""
    out = []
    for T in cache_lengths:
        prompts = synthetic_prompts(model, batch_size, int(T), seed)
        batch = pad_prompts(model, prompts)
        step = run_prefill(model, batch, prefill_chunk)
        token = _argmax(step.logits)
        step = decode_step(model, token[:, None], step.cache, batch.positions.rope_deltas)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            token = _argmax(step.logits)
            step = decode_step(model, token[:, None], step.cache, batch.positions.rope_deltas)
        out.append(StepCost(int(T), (time.perf_counter() - t0) / steps, step.cache.nbytes))
    return out
