"""The generation loop, built from the step functions only (mlx-examples style: it yields tokens).

    prompt = prepare_prompt(model, "Hello")                           # ids, embeddings, 3-D positions
    for token in generate_tokens(model, prompt, sampler, max_new_tokens=20):
        ...                                                           # one int per decode step

`generate_tokens` stops after an end-of-sequence token (<|im_end|> / <|endoftext|>, which it still
yields, as transformers' generate returns it) or after max_new_tokens. `tokenizer.stream_text` turns
the tokens into text pieces without ever splitting a multi-byte character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .model import Model
from .positions import Positions
from .steps import build_positions, decode_step, embed, prefill, tokenize

Sampler = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (logits (B, V), previous ids (B, T)) -> (B,)


@dataclass
class Prompt:
    """Everything prefill needs, computed before the decoder runs (inspectable in notebooks)."""

    input_ids: np.ndarray  # (B, S) int64
    inputs_embeds: np.ndarray  # (B, S, H), image features already merged
    positions: Positions  # position_ids (3, B, S), rope_deltas (B, 1)
    deepstack: np.ndarray | None = None  # (D, B, S, H), None for text-only prompts
    attention_mask: np.ndarray | None = None  # (B, S), None = no padding

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


def check_context(model: Model, prompt_length: int) -> None:
    limit = model.context_length
    if prompt_length >= limit:
        raise UserError(f"the prompt has {prompt_length} tokens but the model's context holds {limit}; "
                        "shorten the prompt (or use a checkpoint with a longer max_position_embeddings)")


def prepare_ids(model: Model, input_ids: np.ndarray) -> Prompt:
    """A text-only prompt from token ids (1, S)."""
    input_ids = np.asarray(input_ids, np.int64).reshape(1, -1)
    check_context(model, input_ids.shape[1])
    return Prompt(input_ids, embed(model, input_ids), build_positions(input_ids))


def prepare_prompt(model: Model, prompt: str, *, raw: bool = False) -> Prompt:
    """A user turn through the chat template (or raw text) -> ids, embeddings and positions."""
    return prepare_ids(model, tokenize(model, prompt, raw=raw))


def generate_tokens(model: Model, prompt: Prompt, sampler: Sampler, max_new_tokens: int = 100,
                    eos_token_ids: Sequence[int] | None = None) -> Iterator[int]:
    """Prefill once, then one decode step per token; yields each new token id (batch of one)."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    budget = min(max_new_tokens, model.context_length - prompt.length)
    step = prefill(model, prompt.inputs_embeds, prompt.positions, attention_mask=prompt.attention_mask,
                   deepstack=prompt.deepstack)
    history = prompt.input_ids
    for n in range(budget):
        token = np.asarray(sampler(step.logits, history), np.int64).reshape(-1)  # (B,)
        yield int(token[0])
        if int(token[0]) in eos or n + 1 == budget:
            return
        history = np.concatenate([history, token[:, None]], axis=1)
        step = decode_step(model, token[:, None], step.cache, prompt.positions.rope_deltas)
