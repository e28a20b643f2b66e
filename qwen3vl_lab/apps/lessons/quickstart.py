"""Notebook 01's exercise: the greedy generation loop, written with the step functions.

    from qwen3vl_lab.apps.lessons import quickstart as lesson
    lesson.check_greedy_generate(my_fn, model, prompt)   # where it differs, with a hint
    lesson.greedy_generate                               # the reference solution

greedy_generate(model, prompt, max_new_tokens) -> list of token ids: prefill the prepared `Prompt` (its
merged image embeddings, positions and DeepStack features) once, then take the most likely token and feed
it back through `decode_step` with the cache the previous step returned, max_new_tokens tokens in all (no
stopping at end-of-turn).
The check's oracle: `qwen3vl_lab.generate.generate_tokens` with the greedy sampler, the library's own loop
(tests compare it with transformers' generate), never the reference solution below.
"""

from __future__ import annotations

import numpy as np

from ...generate import Prompt, generate_tokens
from ...pipeline import greedy
from ...steps import decode_step, prefill
from .grading import graded, mismatch


# -- the reference solution ------------------------------------------------------------------------
def greedy_generate(model, prompt: Prompt, max_new_tokens: int) -> list[int]:
    step = prefill(model, prompt.inputs_embeds, prompt.positions, deepstack=prompt.deepstack)  # logits (1, V)
    tokens = []
    for _ in range(max_new_tokens):
        token = step.logits.argmax(axis=-1)  # (1,): the most likely next token
        tokens.append(int(token[0]))
        if len(tokens) < max_new_tokens:
            step = decode_step(model, token[:, None], step.cache, prompt.positions.rope_deltas)  # the cache grows by 1
    return tokens


# -- the usual mistakes, run to recognise them -----------------------------------------------------
def _stale_cache(model, prompt: Prompt, n: int) -> list[int]:
    """Every decode step fed the prefill's cache instead of the one the previous step returned."""
    first = prefill(model, prompt.inputs_embeds, prompt.positions, deepstack=prompt.deepstack)
    step, tokens = first, []
    for _ in range(n):
        token = step.logits.argmax(axis=-1)
        tokens.append(int(token[0]))
        step = decode_step(model, token[:, None], first.cache, prompt.positions.rope_deltas)
    return tokens


def _no_deltas(model, prompt: Prompt, n: int) -> list[int]:
    """Decode positions without rope_deltas: the k-th new token at S + k instead of S + k + delta."""
    no_delta = np.zeros_like(prompt.positions.rope_deltas)
    step = prefill(model, prompt.inputs_embeds, prompt.positions, deepstack=prompt.deepstack)
    tokens = []
    for _ in range(n):
        token = step.logits.argmax(axis=-1)
        tokens.append(int(token[0]))
        step = decode_step(model, token[:, None], step.cache, no_delta)
    return tokens


def _no_deepstack(model, prompt: Prompt, n: int) -> list[int]:
    """Prefill without the DeepStack features (the image's early-layer features never reach the decoder)."""
    step = prefill(model, prompt.inputs_embeds, prompt.positions)
    tokens = []
    for _ in range(n):
        token = step.logits.argmax(axis=-1)
        tokens.append(int(token[0]))
        step = decode_step(model, token[:, None], step.cache, prompt.positions.rope_deltas)
    return tokens


MISTAKES = (
    (_stale_cache, "feed each decode step the cache the previous step returned (step.cache), not the prefill's: "
                   "otherwise every step forgets the tokens generated since"),
    (_no_deltas, "pass prompt.positions.rope_deltas to decode_step: with an image the next position is "
                 "S + k + delta (delta < 0), not S + k"),
    (_no_deepstack, "prefill with deepstack=prompt.deepstack: the image's early vision features are added "
                    "after the first decoder layers"),
)


def _hint(got: list[int], model, prompt: Prompt, n: int) -> str:
    if len(got) == n + 1:
        return f"return exactly max_new_tokens = {n} tokens"
    for mistake, hint in MISTAKES:
        if mistake(model, prompt, n) == got:
            return hint
    return ("prefill once (inputs_embeds, positions, deepstack), then repeat: token = argmax of the last logits; "
            "keep it; decode_step(model, token[:, None], step.cache, prompt.positions.rope_deltas)")


def _run(student_fn, model, prompt: Prompt, n: int) -> None:
    want = list(generate_tokens(model, prompt, greedy, max_new_tokens=n, eos_token_ids=[]))  # (n,)
    got = [int(t) for t in student_fn(model, prompt, n)]
    if len(got) != len(want):
        raise mismatch("number of tokens", len(got), len(want), _hint(got, model, prompt, n))
    for k, (g, w) in enumerate(zip(got, want)):
        if g != w:
            text = model.tokenizer.decode
            raise mismatch(f"token {k} ({text([g])!r} vs {text([w])!r})", got, want, _hint(got, model, prompt, n))


def check_greedy_generate(student_fn, model, prompt: Prompt, max_new_tokens: int = 6) -> bool:
    """student_fn(model, prompt, max_new_tokens) -> token ids; compared with the library's greedy loop."""
    return graded("greedy_generate", student_fn, lambda fn: _run(fn, model, prompt, max_new_tokens))


__all__ = ["check_greedy_generate", "greedy_generate"]
