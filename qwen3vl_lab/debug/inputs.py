"""What the doctor's functions take: models (a `Model` or a folder) and prompts (text, text + image, or a `Prompt`).

    ref, test = as_model("OUT", "fp32"), as_model("OUT", "int4")        # or load_model(...) yourself
    prompts = [PromptSpec("Describe Paris."), PromptSpec("What is this?", image="photo.jpg", image_size=64)]
    prepare(ref, prompts[1])                                           # -> generate.Prompt (ids, embeds, positions, DeepStack)

Image prompts go through `generate.prepare_multimodal_prompt` (vision tower, merge, DeepStack, 3-D positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort

from .. import generate
from ..errors import UserError
from ..generate import Prompt, prepare_prompt
from ..model import Model, RuntimeOptions, inspection_options, load_model

DEFAULT_PROMPTS = (
    "Give me a short introduction to large language models.",
    "Write a haiku about the sea.",
    "你好！请用一句话介绍你自己。",
)


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of a comparison: a user turn, optionally with one image (path, PIL image or array)."""

    text: str
    image: object = None
    image_size: int | None = None  # None: the checkpoint's smart_resize; N: resize to N x N (fast on tiny models)

    @property
    def label(self) -> str:
        short = self.text if len(self.text) <= 32 else self.text[:29] + "..."
        return f"[image] {short}" if self.image is not None else short


PromptLike = Union[str, PromptSpec, Prompt]


def open_model(source: Model | str | Path, precision: str = "fp32", options: RuntimeOptions | None = None, *,
               open_decoder: bool = True) -> Model:
    """A Model passes through; a folder is loaded with its decoder opened with `model.inspection_options`
    (open_decoder=False: model.onnx is opened on first use, for callers that only run an edited copy)."""
    if isinstance(source, Model):
        return source
    model = load_model(source, precision, options, open_decoder=False)
    if open_decoder and model.decoder_session is None:  # (a foreign decoder may have opened to give its config)
        path = model.decoder_file
        graph = onnx.load(str(path), load_external_data=False)
        so = inspection_options(model.options, graph)
        try:
            model.decoder_session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises several types for corrupt files
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            reason = reason if len(reason) <= 240 else "..." + reason[-240:]  # onnxruntime's own sentence comes last
            raise UserError(f"{path} could not be loaded by onnxruntime ({reason}); re-export it with "
                            "`qwen3vl-lab export`") from None
    return model


def as_model(model: Model | str | Path, precision: str = "fp32", *, open_decoder: bool = True) -> Model:
    """A loaded Model, or an export folder (root with cpu-<precision>/, or one precision folder) to load
    (`open_model`; open_decoder=False: model.onnx is opened on first use)."""
    return open_model(model, precision, open_decoder=open_decoder)


def as_spec(prompt: PromptLike, image=None, image_size: int | None = None) -> PromptSpec | Prompt:
    if isinstance(prompt, (PromptSpec, Prompt)):
        return prompt
    if not isinstance(prompt, str):
        raise UserError(f"a prompt must be text, a PromptSpec or a prepared Prompt, got {type(prompt).__name__}")
    return PromptSpec(prompt, image, image_size)


def as_specs(prompts: Sequence[PromptLike] | PromptLike | None, image=None,
             image_size: int | None = None) -> list[PromptSpec | Prompt]:
    """Prompts for a comparison. With `image`, every text prompt also gets an image version."""
    if prompts is None:
        prompts = DEFAULT_PROMPTS
    if isinstance(prompts, (str, PromptSpec, Prompt)):
        prompts = [prompts]
    specs = [as_spec(p) for p in prompts]
    if image is not None:
        specs += [PromptSpec(s.text, image, image_size) for s in specs if isinstance(s, PromptSpec) and s.image is None]
    if not specs:
        raise UserError("no prompts given; pass at least one --prompt")
    return specs


def label_of(prompt: PromptSpec | Prompt) -> str:
    if isinstance(prompt, PromptSpec):
        return prompt.label
    kind = "multimodal" if prompt.deepstack is not None else "text"
    return f"<prepared {kind} prompt, {prompt.length} tokens>"


def prepare(model: Model, prompt: PromptLike) -> Prompt:
    """A Prompt for `model`: a prepared Prompt passes through unchanged (the same tensors feed both models)."""
    spec = as_spec(prompt)
    if isinstance(spec, Prompt):
        return spec
    if spec.image is None:
        return prepare_prompt(model, spec.text)
    multimodal = getattr(generate, "prepare_multimodal_prompt", None)
    if multimodal is None:
        raise UserError("image prompts need generate.prepare_multimodal_prompt, which this version lacks; "
                        "compare with text prompts only")
    return multimodal(model, spec.text, images=[spec.image], image_size=spec.image_size)


def same_tokens(a: Prompt, b: Prompt) -> None:
    if a.input_ids.shape != b.input_ids.shape or not np.array_equal(a.input_ids, b.input_ids):
        raise UserError("the two models turn the prompt into different token ids (different tokenizers or image "
                        "settings); compare folders exported from the same checkpoint")
