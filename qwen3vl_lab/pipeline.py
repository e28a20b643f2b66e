"""The seed guide's Python API: load once, generate many times.

    from qwen3vl_lab import Qwen3VLPipeline
    pipe = Qwen3VLPipeline(model_dir="models/tiny-onnx", text_precision="fp32")
    text = pipe.generate(prompt="Hello, who are you?", max_new_tokens=50, temperature=0.0)
    text = pipe.generate("Describe this image.", images=["photo.jpg"], temperature=0.0)  # paths, PIL, numpy
    text = pipe.generate("What happens?", videos=["frames/"], image_size=384)             # a folder of frames
    texts = pipe.generate(prompt=["first prompt", "second prompt"], max_new_tokens=20)

Each image is run through the vision tower once per pipeline: asking again about the same image
(same pixels after preprocessing) reuses its features. `Qwen3VLTextOnlyPipeline` is the same
pipeline refusing images.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import UserError
from .generate import Prompt, generate_tokens, prepare_multimodal_prompt, prepare_prompt
from .model import Model, RuntimeOptions, load_model
from .sampling import SamplingConfig, make_sampler
from .tokenizer import stream_text


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the generated ids only (an end-of-sequence id included when one was produced)
    prompt_tokens: int
    stop_reason: str  # "eos" or "max_new_tokens"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "new_tokens": len(self.token_ids), "stop_reason": self.stop_reason, **self.extra}


class Qwen3VLPipeline:
    """Text, images and videos in, text out. Sessions load once per object; encoded images are reused."""

    max_cached_images = 64

    def __init__(self, model_dir: str | Path, text_precision: str = "fp32", options: RuntimeOptions | None = None):
        self.model: Model = load_model(model_dir, text_precision, options)
        self.vision_cache: OrderedDict[str, object] = OrderedDict()  # pixel hash -> VisionFeatures
        self.vision_calls = 0  # how many images/videos went through the vision tower

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def encode_cached(self, pixel_values: np.ndarray, grid_thw: np.ndarray):
        """One image's (or video's) VisionFeatures, computed once per distinct pixels."""
        from .steps import encode_image  # noqa: PLC0415

        key = hashlib.sha1(np.ascontiguousarray(grid_thw, np.int64).tobytes()
                           + np.ascontiguousarray(pixel_values, np.float32).tobytes()).hexdigest()
        if key not in self.vision_cache:
            self.vision_cache[key] = encode_image(self.model, pixel_values, grid_thw)
            self.vision_calls += 1
            while len(self.vision_cache) > self.max_cached_images:
                self.vision_cache.popitem(last=False)
        self.vision_cache.move_to_end(key)
        return self.vision_cache[key]

    def _prepare(self, prompt: str, raw: bool, images=None, videos=None, image_size=None,
                 video_fps: float = 2.0) -> Prompt:
        return prepare_multimodal_prompt(self.model, prompt, images, videos, image_size, raw,
                                         video_fps=video_fps, encoder=self.encode_cached)

    def _sampler(self, sampler, temperature, top_k, top_p, no_sample, seed, repetition_penalty):
        if sampler is not None:
            if not callable(sampler):
                raise UserError("sampler must be a callable (logits (B, V), previous_ids (B, T)) -> ids (B,)")
            return make_sampler(sampler)
        config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, no_sample=no_sample,
                                repetition_penalty=repetition_penalty, seed=seed)
        config.validate()
        return make_sampler(config)

    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 0.7, top_k: int = 20,
               top_p: float = 0.8, no_sample: bool = False, seed: int | None = None,
               repetition_penalty: float = 1.0, sampler: Callable | None = None, raw: bool = False,
               result: dict | None = None, images=None, videos=None, image_size=None,
               video_fps: float = 2.0) -> Iterator[str]:
        """Yield text pieces as they are generated. Pass `result={}` to receive a GenerationResult in it.

        images: a path, PIL image or numpy array, or a list of them (before the text, in order); videos: a
        list of folders of frames or lists of frames taken at `video_fps`; image_size: fixed N x N resize.
        """
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        sample = self._sampler(sampler, temperature, top_k, top_p, no_sample, seed, repetition_penalty)
        p = self._prepare(prompt, raw, images=images, videos=videos, image_size=image_size, video_fps=video_fps)
        ids: list[int] = []

        def tokens():
            for t in generate_tokens(self.model, p, sample, max_new_tokens):
                ids.append(t)
                yield t

        pieces = []
        for piece in stream_text(self.tokenizer, tokens()):
            pieces.append(piece)
            yield piece
        if result is not None:
            eos = bool(ids) and ids[-1] in self.model.config.eos_token_ids
            result["result"] = GenerationResult("".join(pieces), ids, p.length, "eos" if eos else "max_new_tokens")

    def generate_result(self, prompt: str, **kwargs) -> GenerationResult:
        box: dict = {}
        for _ in self.stream(prompt, result=box, **kwargs):
            pass
        return box["result"]

    def generate(self, prompt: str | list[str], max_new_tokens: int = 100, temperature: float = 0.7,
                 top_k: int = 20, top_p: float = 0.8, no_sample: bool = False, seed: int | None = None,
                 repetition_penalty: float = 1.0, sampler: Callable | None = None,
                 raw: bool = False, images=None, videos=None, image_size=None,
                 video_fps: float = 2.0) -> str | list[str]:
        """The generated text; a list of prompts gives a list of texts in the same order.

        images / videos go with every prompt of a list (encoded once, then reused)."""
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      no_sample=no_sample, seed=seed, repetition_penalty=repetition_penalty, sampler=sampler,
                      raw=raw, images=images, videos=videos, image_size=image_size, video_fps=video_fps)
        if isinstance(prompt, (list, tuple)):
            return [self.generate_result(p, **kwargs).text for p in prompt]
        return self.generate_result(prompt, **kwargs).text


class Qwen3VLTextOnlyPipeline(Qwen3VLPipeline):
    """Text in, text out: `Qwen3VLPipeline` without images or videos (never loads the vision tower)."""

    def _prepare(self, prompt: str, raw: bool, images=None, videos=None, image_size=None,
                 video_fps: float = 2.0) -> Prompt:
        if any(x is not None and not (isinstance(x, (list, tuple)) and not x) for x in (images, videos)):
            raise UserError("Qwen3VLTextOnlyPipeline takes text only; use Qwen3VLPipeline for images and videos")
        return prepare_prompt(self.model, prompt, raw=raw)


def greedy(logits: np.ndarray, previous_ids: np.ndarray | None = None) -> np.ndarray:
    """The simplest sampler: the most likely token of each row."""
    return np.argmax(logits, axis=-1)
