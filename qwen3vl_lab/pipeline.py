"""The seed guide's Python API: load once, generate many times.

    from qwen3vl_lab import Qwen3VLPipeline
    pipe = Qwen3VLPipeline(model_dir="models/tiny-onnx", text_precision="fp32")
    text = pipe.generate(prompt="Hello, who are you?", max_new_tokens=50, temperature=0.0)
    text = pipe.generate("Describe this image.", images=["photo.jpg"], temperature=0.0)  # paths, PIL, numpy
    text = pipe.generate("What happens?", videos=["frames/"], image_size=384)             # a folder of frames
    texts = pipe.generate(prompt=["first prompt", "second prompt"], max_new_tokens=20)   # one batch
    texts = pipe.generate(["What is it?", "Hi"], images=[["a.png"], None], batch_size=8)  # images per prompt
    text = pipe.generate(long_prompt, prefill_chunk=1024)                                  # prefill in pieces
    pipe = Qwen3VLPipeline("models/tiny-onnx", "int4", fast=True)    # fused decoder, preallocated KV (fast.py)

A list of prompts runs `batch_size` prompts at a time as one left-padded batch (`generate.pad_prompts`);
greedy results equal running each prompt alone.

Each image is run through the vision tower once per pipeline: asking again about the same image
(same pixels after preprocessing) reuses its features. `Qwen3VLTextOnlyPipeline` is the same
pipeline refusing images.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import UserError
from .generate import Prompt, generate_batch, generate_tokens, prepare_multimodal_prompt, prepare_prompt
from .image import ImageProcessorConfig, native_size, target_size
from .limits import check_image_memory, check_image_size
from .model import Model, RuntimeOptions, load_model
from .paths import as_path
from .sampling import SamplingConfig, greedy, make_sampler  # noqa: F401 (greedy: pipeline.greedy stays importable)
from .steps import encode_image
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

    def __init__(self, model_dir: str | Path, text_precision: str = "fp32", options: RuntimeOptions | None = None,
                 fast: bool = False, *, tokenizer_dir: str | Path | None = None, accept_missing: bool = False):
        """fast=True: single prompts run on the fused decoder with preallocated KV buffers (fast.py), same tokens;
        the teaching decoder is then only opened if a padded batch of prompts needs it.

        model_dir: any export `layouts.find_layout` knows (ours, the guide's, onnxruntime-genai's, onnx-community's,
        a decoder .onnx). tokenizer_dir: where the tokenizer is if the export has none. accept_missing: run an image
        prompt on a decoder that lacks 3-D positions or DeepStack (`self.notices` and each result say so)."""
        self.fast = fast
        as_path(model_dir, "model_dir")
        if text_precision not in ("fp32", "int4"):
            raise UserError(f"text_precision must be 'fp32' or 'int4', got {text_precision!r}")
        if options is not None and not isinstance(options, RuntimeOptions):
            raise UserError(f"options must be a RuntimeOptions (e.g. RuntimeOptions(threads=2)), got {type(options).__name__}")
        self.model: Model = load_model(model_dir, text_precision, options, open_decoder=not fast,
                                       tokenizer_dir=tokenizer_dir, accept_missing=accept_missing)
        if fast:
            self.model.fast_decoder_file()  # a folder without model-fast.onnx fails here, not at the first prompt
        self.vision_cache: OrderedDict[str, object] = OrderedDict()  # pixel hash -> VisionFeatures
        self.vision_calls = 0  # how many images/videos went through the vision tower

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def encode_cached(self, pixel_values: np.ndarray, grid_thw: np.ndarray):
        """One image's (or video's) VisionFeatures, computed once per distinct pixels."""
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
        _check_prompt(prompt)
        if images is not None or videos is not None:
            self._check_memory(images, image_size)
        return prepare_multimodal_prompt(self.model, prompt, images, videos, image_size, raw,
                                         video_fps=video_fps, encoder=self.encode_cached)

    def _check_memory(self, images, image_size) -> None:
        """Refuse, before any pixel is decoded, an image whose vision call would not fit in memory (limits.py):
        a fixed image_size, or each image file's size after the processor's resize (read from its header)."""
        vis = self.model.config.vision
        check_image_size(image_size, vis.num_heads, vis.patch_size)
        folder = self.model.root / "pytorch"
        config = ImageProcessorConfig.from_dir(folder) if (folder / "preprocessor_config.json").is_file() \
            else ImageProcessorConfig()
        for image in images if isinstance(images, (list, tuple)) else [images]:
            size = native_size(image) if image is not None else None
            if size is not None and min(size) > 0:
                try:
                    height, width = target_size(*size, config, image_size)
                except UserError:
                    continue  # e.g. an extreme aspect ratio: preprocessing names it, with the image's name
                label = f"{image} resized to" if isinstance(image, (str, Path)) else "an image resized to"
                check_image_memory(height, width, vis.num_heads, vis.patch_size, what=label)

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
               video_fps: float = 2.0, prefill_chunk: int | None = None) -> Iterator[str]:
        """Yield text pieces as they are generated. Pass `result={}` to receive a GenerationResult in it.

        images: a path, PIL image or numpy array, or a list of them (before the text, in order); videos: a
        list of folders of frames or lists of frames taken at `video_fps`; image_size: fixed N x N resize.
        prefill_chunk: run the prompt through the decoder N tokens at a time (same result, less memory).
        """
        _check_count(max_new_tokens, "max_new_tokens")
        _check_chunk(prefill_chunk)
        sample = self._sampler(sampler, temperature, top_k, top_p, no_sample, seed, repetition_penalty)
        p = self._prepare(prompt, raw, images=images, videos=videos, image_size=image_size, video_fps=video_fps)
        ids: list[int] = []

        def tokens():
            for t in generate_tokens(self.model, p, sample, max_new_tokens, prefill_chunk=prefill_chunk, fast=self.fast):
                ids.append(t)
                yield t

        pieces = []
        for piece in stream_text(self.tokenizer, tokens()):
            pieces.append(piece)
            yield piece
        if result is not None:
            result["result"] = self._result(p, ids, "".join(pieces))

    @property
    def notices(self) -> list[str]:
        """What the export lacks or what was filled in (`Model.notices`)."""
        return self.model.notices

    def _result(self, p: Prompt, ids: list[int], text: str | None = None) -> GenerationResult:
        text = "".join(stream_text(self.tokenizer, ids)) if text is None else text
        eos = bool(ids) and ids[-1] in self.model.config.eos_token_ids
        missing = list(self.model.teaching_decoder.missing_used) if self.model.decoder_session is not None else []
        return GenerationResult(text, ids, p.length, "eos" if eos else "max_new_tokens",
                                {"missing": missing} if missing else {})

    def generate_result(self, prompt: str, **kwargs) -> GenerationResult:
        box: dict = {}
        for _ in self.stream(prompt, result=box, **kwargs):
            pass
        return box["result"]

    def iter_results(self, prompts: Sequence[str], images=None, videos=None, batch_size: int = 8,
                     max_new_tokens: int = 100, temperature: float = 0.7, top_k: int = 20, top_p: float = 0.8,
                     no_sample: bool = False, seed: int | None = None, repetition_penalty: float = 1.0,
                     sampler: Callable | None = None, raw: bool = False, image_size=None, video_fps: float = 2.0,
                     prefill_chunk: int | None = None) -> Iterator[GenerationResult]:
        """One GenerationResult per prompt, in order, `batch_size` prompts per decoder batch.

        images / videos: one entry per prompt (None, one image, or a list of images). With sampling, one
        random stream serves the whole batch, so sampled texts depend on batch_size; greedy ones do not.
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise UserError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        for p in prompts:
            _check_prompt(p)
        _check_count(batch_size, "batch_size")
        _check_count(max_new_tokens, "max_new_tokens")
        _check_chunk(prefill_chunk)
        images, videos = _per_prompt(images, len(prompts), "images"), _per_prompt(videos, len(prompts), "videos")
        sample = self._sampler(sampler, temperature, top_k, top_p, no_sample, seed, repetition_penalty)
        for start in range(0, len(prompts), batch_size):
            rows = range(start, min(start + batch_size, len(prompts)))
            batch = [self._prepare(prompts[i], raw, images=images[i], videos=videos[i], image_size=image_size,
                                   video_fps=video_fps) for i in rows]
            for p, ids in zip(batch, generate_batch(self.model, batch, sample, max_new_tokens,
                                                    prefill_chunk=prefill_chunk)):
                yield self._result(p, ids)

    def generate(self, prompt: str | list[str], max_new_tokens: int = 100, temperature: float = 0.7,
                 top_k: int = 20, top_p: float = 0.8, no_sample: bool = False, seed: int | None = None,
                 repetition_penalty: float = 1.0, sampler: Callable | None = None,
                 raw: bool = False, images=None, videos=None, image_size=None,
                 video_fps: float = 2.0, batch_size: int = 8, prefill_chunk: int | None = None) -> str | list[str]:
        """The generated text; a list of prompts gives a list of texts in the same order, run in batches.

        For a list of prompts, images / videos hold one entry per prompt (None, an image or a list of images)."""
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      no_sample=no_sample, seed=seed, repetition_penalty=repetition_penalty, sampler=sampler,
                      raw=raw, images=images, videos=videos, image_size=image_size, video_fps=video_fps,
                      prefill_chunk=prefill_chunk)
        if isinstance(prompt, (list, tuple)):
            return [r.text for r in self.iter_results(prompt, batch_size=batch_size, **kwargs)]
        return self.generate_result(prompt, **kwargs).text


class Qwen3VLTextOnlyPipeline(Qwen3VLPipeline):
    """Text in, text out: `Qwen3VLPipeline` without images or videos (never loads the vision tower)."""

    def _prepare(self, prompt: str, raw: bool, images=None, videos=None, image_size=None,
                 video_fps: float = 2.0) -> Prompt:
        if any(x is not None and not (isinstance(x, (list, tuple)) and not x) for x in (images, videos)):
            raise UserError("Qwen3VLTextOnlyPipeline takes text only; use Qwen3VLPipeline for images and videos")
        _check_prompt(prompt)
        return prepare_prompt(self.model, prompt, raw=raw)


def _per_prompt(items, n: int, name: str) -> list:
    """None -> [None] * n; otherwise a list/tuple with one entry per prompt."""
    if items is None:
        return [None] * n
    if not isinstance(items, (list, tuple)) or len(items) != n:
        got = f"{len(items)} entries" if isinstance(items, (list, tuple)) else f"a {type(items).__name__}"
        raise UserError(f"{name} for a list of {n} prompts must be a list with one entry per prompt (None, one "
                        f"item, or a list of items), got {got}; e.g. {name}=[['a.png'], None]")
    return list(items)


def _check_count(value, name: str) -> None:
    """A whole number >= 1 (numpy integers too; not bool, not float)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def _check_prompt(prompt) -> None:
    """A str that is valid Unicode text (no lone surrogates: bytes that were not UTF-8)."""
    if not isinstance(prompt, str):
        raise UserError(f"prompt must be a str (or a list of str for a batch), got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"the prompt is not valid UTF-8 text (undecodable byte at character {e.start}); "
                        "type or save it as UTF-8") from None


def _check_chunk(prefill_chunk) -> None:
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, (int, np.integer))
                                      or prefill_chunk < 1):
        raise UserError(f"prefill_chunk must be None or an integer >= 1, got {prefill_chunk!r}; e.g. 1024")
