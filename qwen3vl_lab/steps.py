"""The step functions: one prompt, one token at a time, each result a numpy array you can inspect.

    ids       = tokenize(model, "Hello")                         # (1, S) int64
    embeds    = embed(model, ids)                                # (1, S, H)
    positions = build_positions(ids)                             # (3, 1, S) t/h/w rows + rope_deltas
    step      = prefill(model, embeds, positions)                # step.logits (1, V), step.cache
    token     = sample(step.logits, ...)                         # (1,)
    step      = decode_step(model, token[:, None], step.cache, positions.rope_deltas)

Images add three steps between `embed` and `prefill` (`generate.prepare_multimodal_prompt` chains them):

    pixel_values, grid = image.preprocess(["photo.jpg"])                     # (N, 1536), (n, 3)
    ids       = tokenize(model, "Describe it.", image_grid_thw=grid)          # <|image_pad|> x n_tokens
    feats     = encode_image(model, pixel_values, grid)                       # (n_tokens, H), (D, n_tokens, H)
    embeds    = merge_vision(embed(model, ids), ids, feats)                   # features at the pads
    deepstack = deepstack_embeds(ids, feats)                                  # (D, 1, S, H) for prefill
    positions = build_positions(ids, grid)                                    # 3-D positions, rope_deltas < 0
    step      = prefill(model, embeds, positions, deepstack=deepstack)

Batches: every function takes B rows. `generate.pad_prompts` left-pads single prompts the way
transformers does (attention_mask 0 at the pads, each row keeping its own positions). Long prompts:
`prefill_chunked` runs the prompt in pieces of N tokens with the same result and less memory.

The generation loop in `generate.py` is built from these functions only.
"""

from __future__ import annotations

import numpy as np

from .cache import KVCache
from .config import IMAGE_TOKEN_ID
from .decoder import Step
from .errors import UserError
from .model import Model
from .positions import Positions, build_positions
from .tokenizer import encode_prompt, format_chat
from .vision import VisionFeatures
from .vision import encode_image as run_vision_tower

__all__ = ["Step", "tokenize", "embed", "encode_image", "merge_vision", "deepstack_embeds", "build_positions",
           "prefill", "prefill_chunked", "decode_step", "zeros_deepstack"]


def tokenize(model: Model, prompt: str, *, raw: bool = False, image_grid_thw: np.ndarray | None = None,
             video_grid_thw: np.ndarray | None = None, video_timestamps=None) -> np.ndarray:
    """(1, S) int64 ids of one user turn through the chat template (or the bare text when raw).

    Images (then videos) come before the text in the user turn; each placeholder is expanded to its
    grid's token count (videos: one timestamped block per frame pair)."""
    n_images = 0 if image_grid_thw is None else len(np.asarray(image_grid_thw).reshape(-1, 3))
    n_videos = 0 if video_grid_thw is None else len(np.asarray(video_grid_thw).reshape(-1, 3))
    if raw:
        text = prompt
    elif n_videos:
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
        text = format_chat(model.tokenizer, [{"role": "user", "content": content}])
    else:
        text = format_chat(model.tokenizer, prompt, images=n_images)
    ids = encode_prompt(model.tokenizer, text, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                        merge_size=model.config.vision.spatial_merge_size, video_timestamps=video_timestamps)
    return ids[None, :]


def embed(model: Model, input_ids: np.ndarray) -> np.ndarray:
    """Token ids (B, S) -> embeddings (B, S, H): a row lookup in the embedding table."""
    return model.embed(input_ids)


def encode_image(model: Model, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> VisionFeatures:
    """Pixel patches (N, 1536) + grids (n, 3) from `image.preprocess` -> VisionFeatures:
    image_features (n_tokens, H) for the placeholders, deepstack (D, n_tokens, H) for the decoder.
    Videos go through the same call (pixel_values_videos, video_grid_thw)."""
    return run_vision_tower(model.vision, pixel_values, image_grid_thw, model.config)


def merge_vision(inputs_embeds: np.ndarray, input_ids: np.ndarray, image_features: np.ndarray | VisionFeatures,
                 token_id: int = IMAGE_TOKEN_ID) -> np.ndarray:
    """Put image features at the `<|image_pad|>` positions, in reading order (transformers' masked_scatter).

    Pass token_id=model.config.video_token_id to place video features."""
    image_features = getattr(image_features, "image_features", image_features)  # (n_visual, H)
    mask = np.asarray(input_ids) == token_id  # (B, S)
    if mask.sum() != len(image_features):
        raise UserError(f"the prompt has {int(mask.sum())} image tokens but the images give {len(image_features)} "
                        "features; build the prompt with the same images")
    out = inputs_embeds.copy()
    out[mask] = image_features  # (n_visual, H) into (B, S, H)
    return out


def deepstack_embeds(input_ids: np.ndarray, deepstack: np.ndarray | VisionFeatures, token_id: int = IMAGE_TOKEN_ID,
                     into: np.ndarray | None = None) -> np.ndarray:
    """DeepStack features (D, n_visual, H) -> the decoder's dense input (D, B, S, H), zero elsewhere.

    Row k goes to the k-th `token_id` position in reading order (like `merge_vision`); decoder layer j
    adds slice j after it runs (transformers' `_deepstack_process`). For images and videos in one
    prompt, fill `into` twice: `deepstack_embeds(ids, vid.deepstack, video_token_id, into=dense_images)`.
    """
    deepstack = np.asarray(getattr(deepstack, "deepstack", deepstack), np.float32)  # (D, n_visual, H)
    mask = np.asarray(input_ids) == token_id  # (B, S)
    if deepstack.ndim != 3 or deepstack.shape[1] != mask.sum():
        raise UserError(f"deepstack features have shape {deepstack.shape} but the prompt has {int(mask.sum())} "
                        "visual tokens; pass (D, n_visual, H) from the same images as the prompt")
    out = np.zeros((deepstack.shape[0], *mask.shape, deepstack.shape[2]), np.float32) if into is None else into
    out[:, mask] = deepstack  # (D, n_visual, H) into (D, B, S, H)
    return out


def zeros_deepstack(model: Model, batch: int, seq: int) -> np.ndarray:
    """Text-only prompts (and every decode step) add nothing at the DeepStack layers."""
    return np.zeros((model.config.num_deepstack, batch, seq, model.config.text.hidden_size), np.float32)


def prefill(model: Model, inputs_embeds: np.ndarray | None, positions: Positions, cache: KVCache | None = None, *,
            attention_mask: np.ndarray | None = None, deepstack: np.ndarray | None = None,
            logits_to_keep: int = 1, input_ids: np.ndarray | None = None) -> Step:
    """Run the whole prompt (B, S, H) through the decoder and fill the cache.

    attention_mask (B, S): 0 marks left padding. logits_to_keep=1 computes logits for the last
    position only (what generation needs); 0 keeps all positions (B, S, V). input_ids (B, S) are
    needed only by a decoder that embeds tokens itself (`model.teaching_decoder.io.token_input`).
    """
    decoder = model.teaching_decoder
    cache = cache if cache is not None else decoder.new_cache(np.shape(positions.position_ids)[-2])
    return decoder.prefill(cache, inputs_embeds, positions.position_ids, input_ids=input_ids,
                           attention_mask=attention_mask, deepstack=deepstack, logits_to_keep=logits_to_keep)


def decode_step(model: Model, token_ids: np.ndarray, cache: KVCache, rope_deltas: np.ndarray) -> Step:
    """One new token per row (B, 1) -> logits (B, V) and the cache one position longer."""
    return model.teaching_decoder.decode(cache, token_ids, rope_deltas)


def prefill_chunked(model: Model, inputs_embeds: np.ndarray | None, positions: Positions, chunk_size: int,
                    cache: KVCache | None = None, *, attention_mask: np.ndarray | None = None,
                    deepstack: np.ndarray | None = None, logits_to_keep: int = 1,
                    input_ids: np.ndarray | None = None) -> Step:
    """`prefill` in pieces of `chunk_size` tokens: the same cache and logits, less peak memory
    (`Decoder.prefill_chunked`)."""
    decoder = model.teaching_decoder
    cache = cache if cache is not None else decoder.new_cache(np.shape(positions.position_ids)[-2])
    return decoder.prefill_chunked(cache, inputs_embeds, positions.position_ids, chunk_size, input_ids=input_ids,
                                   attention_mask=attention_mask, deepstack=deepstack, logits_to_keep=logits_to_keep)
