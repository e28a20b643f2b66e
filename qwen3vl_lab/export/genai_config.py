"""genai_config.json (onnxruntime-genai's schema, nothing else) and qwen3vl_lab.json (our settings).

onnxruntime-genai 0.18 refuses a genai_config.json with any key it does not know, so the file holds
only its schema and loads with `og.Model(folder)` unchanged:

    model.type "qwen3_vl", token ids, decoder (model.onnx: inputs_embeds, attention_mask, position_ids,
    past/present names), embedding (qwen3vl-embedding-genai.onnx: input_ids + image_features, the inputs
    it feeds), vision (qwen3vl-vision.onnx; only the keys it parses), search.

Everything else lives beside it in qwen3vl_lab.json: the full model config, the precision and INT4
recipe, the DeepStack decoder input (onnxruntime-genai never feeds it: the decoder's default is
zeros), and the vision graph's full I/O. In memory both travel as one dict: genai_config.json's
content plus a "qwen3vl_lab" entry (`make_genai_config` builds it, `write_genai_config` splits it,
`qwen3vl_lab.layouts.read_export_config` joins it again, also for older single-file exports).

What onnxruntime-genai 0.18 does with this folder (measured on the tiny model): text generation gives
our greedy tokens, fp32 and INT4. An image prompt stops when its processor is created ("failed to
open processor_config.json"): we write no onnxruntime-extensions processor config because its vision
pipeline feeds only pixel_values (our vision graph takes precomputed position inputs) and never
DeepStack, so it could not give our answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from ..config import ModelConfig
from ..layout import (
    ATTENTION_MASK,
    DECODER_FILE,
    DEEPSTACK_EMBEDS,
    EMBEDDING_FILE,
    GENAI_CONFIG,
    GENAI_EMBEDDING_FILE,
    IMAGE_FEATURES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGITS,
    OWN_CONFIG,
    OWN_SECTION,
    PIXEL_VALUES,
    POSITION_IDS,
    past_names,
    present_names,
)
from .decoder import PREFIX
from .files import staging_file
from .onnx_graph import FLOAT, INT64, GraphBuilder

DEEPSTACK_INPUT = DEEPSTACK_EMBEDS
GENAI_VISION_KEYS = ("filename", "spatial_merge_size", "patch_size")  # of ours, what 0.18's parser accepts


def make_genai_config(cfg: ModelConfig, precision: str, *, vision: dict | None = None, recipe: dict | None = None,
                      with_attentions: bool = False, source: dict | None = None) -> dict:
    """genai_config.json's content plus our settings under "qwen3vl_lab" (see the module docstring).

    vision: our full vision section (export/vision.py's `vision_genai_section`), or None without a vision model."""
    t = cfg.text
    decoder = {
        "session_options": {"log_id": "qwen3vl-lab", "provider_options": []},
        "filename": DECODER_FILE,
        "head_size": t.head_dim,
        "hidden_size": t.hidden_size,
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "inputs": {
            "inputs_embeds": INPUTS_EMBEDS,
            "attention_mask": ATTENTION_MASK,
            "position_ids": POSITION_IDS,
            "past_key_names": past_names("%d")[0],
            "past_value_names": past_names("%d")[1],
        },
        "outputs": {
            "logits": LOGITS,
            "present_key_names": present_names("%d")[0],
            "present_value_names": present_names("%d")[1],
        },
    }
    model = {
        "type": "qwen3_vl",
        "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else cfg.pad_token_id,
        "eos_token_id": list(cfg.eos_token_ids),
        "pad_token_id": cfg.pad_token_id,
        "context_length": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "decoder": decoder,
        "embedding": {  # onnxruntime-genai feeds image_features (empty for text) to its embedding model
            "filename": GENAI_EMBEDDING_FILE,
            "inputs": {"input_ids": INPUT_IDS, "image_features": IMAGE_FEATURES},
            "outputs": {"inputs_embeds": INPUTS_EMBEDS},
        },
    }
    if vision is not None:  # type qwen3_vl needs a vision section to load at all
        model["vision"] = {**{k: vision[k] for k in GENAI_VISION_KEYS if k in vision},
                           "inputs": {"pixel_values": PIXEL_VALUES}, "outputs": {"image_features": IMAGE_FEATURES}}
    return {
        "model": model,
        "search": {
            "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0,
            "max_length": t.max_position_embeddings, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": False,
        },
        OWN_SECTION: {
            "precision": precision,
            "config": cfg.to_dict(),
            "mrope_section": list(t.mrope_section),
            "spatial_merge_size": cfg.vision.spatial_merge_size,
            "num_deepstack": cfg.num_deepstack,
            "with_attentions": with_attentions,
            "recipe": recipe,
            "source": source or {},
            "decoder": {"inputs": {DEEPSTACK_INPUT: DEEPSTACK_INPUT} if cfg.num_deepstack else {}},
            "embedding": {"filename": EMBEDDING_FILE, "inputs": {"input_ids": INPUT_IDS},
                          "outputs": {"inputs_embeds": INPUTS_EMBEDS}},
            "vision": vision,
        },
    }


def _write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and a rename: a hard-linked original is never edited in place."""
    with staging_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_genai_config(folder: Path, config: dict) -> None:
    """genai_config.json (everything but "qwen3vl_lab") and qwen3vl_lab.json (that section)."""
    folder = Path(folder)
    genai = {k: v for k, v in config.items() if k != OWN_SECTION}
    _write_json(folder / GENAI_CONFIG, genai)
    if OWN_SECTION in config:
        _write_json(folder / OWN_CONFIG, config[OWN_SECTION])


def write_genai_embedding(folder: Path, cfg: ModelConfig) -> Path:
    """qwen3vl-embedding-genai.onnx: the embedding onnxruntime-genai runs for type qwen3_vl.

    input_ids (B, S) i64, image_features (N, H) f32 -> inputs_embeds (B, S, H): the k-th image token's row
    is image_features[k], every other row the embedding table's (N = 0 for text). The table is the one
    in qwen3vl-embedding.onnx.data, referenced, not copied."""
    folder = Path(folder)
    src = onnx.load(str(folder / EMBEDDING_FILE), load_external_data=False)
    table = next(t for t in src.graph.initializer if t.name == f"{PREFIX}.embed_tokens.weight")  # (V, H)
    H = cfg.text.hidden_size
    g = GraphBuilder("qwen3vl_embedding_genai")
    ids = g.input(INPUT_IDS, INT64, ["batch_size", "sequence_length"])
    feats = g.input(IMAGE_FEATURES, FLOAT, ["num_image_tokens", H])
    g.initializers.append(table)  # its external-data entry still names qwen3vl-embedding.onnx.data
    with g.scope("model/embed_tokens"):
        text = g.op("Gather", [table.name, ids], axis=0)  # (B, S, H)
        is_image = g.op("Equal", [ids, g.const(np.int64(cfg.image_token_id))])  # (B, S)
        flat = g.op("Reshape", [is_image, g.const([-1], np.int64)])  # (B*S,)
        rank = g.op("CumSum", [g.op("Cast", [flat], to=INT64), g.const(np.int64(0))])  # k-th image token -> k + 1
        n = g.op("Gather", [g.op("Shape", [feats]), g.const(np.int64(0))])  # N
        row = g.op("Where", [flat, g.op("Sub", [rank, g.const(np.int64(1))]), n])  # other tokens -> row N
        padded = g.op("Concat", [feats, g.const(np.zeros((1, H), np.float32))], axis=0)  # (N + 1, H)
        picked = g.op("Reshape", [g.op("Gather", [padded, row], axis=0), g.op("Shape", [text])])  # (B, S, H)
        mask = g.op("Unsqueeze", [is_image, g.const([-1], np.int64)])  # (B, S, 1)
        out = g.op("Where", [mask, picked, text], out=INPUTS_EMBEDS)
    g.output(out, FLOAT, ["batch_size", "sequence_length", H])
    g.save(folder / GENAI_EMBEDDING_FILE, doc="the embedding onnxruntime-genai runs: image_features into image-token rows")
    return folder / GENAI_EMBEDDING_FILE
