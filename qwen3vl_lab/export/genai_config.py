"""genai_config.json: onnxruntime-genai's schema for the decoder, plus what our runtime needs.

The `model` section follows onnxruntime-genai (decoder/embedding/vision file names, I/O name
patterns, head_size, ...). Our own `qwen3vl_lab` section records the full
model config, the DeepStack input, the precision and the quantization recipe, so tools can report
exactly what a folder holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..layout import DECODER_FILE, EMBEDDING_FILE, GENAI_CONFIG


def make_genai_config(cfg: ModelConfig, precision: str, *, vision: dict | None = None, recipe: dict | None = None,
                      with_attentions: bool = False, source: dict | None = None) -> dict:
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
            "inputs_embeds": "inputs_embeds",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
            "deepstack_embeds": "deepstack_embeds",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
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
        "embedding": {
            "filename": EMBEDDING_FILE,
            "inputs": {"input_ids": "input_ids"},
            "outputs": {"inputs_embeds": "inputs_embeds"},
        },
    }
    if vision is not None:
        model["vision"] = vision
    return {
        "model": model,
        "search": {
            "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0,
            "max_length": t.max_position_embeddings, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": False,
        },
        "qwen3vl_lab": {
            "precision": precision,
            "config": cfg.to_dict(),
            "mrope_section": list(t.mrope_section),
            "spatial_merge_size": cfg.vision.spatial_merge_size,
            "num_deepstack": cfg.num_deepstack,
            "with_attentions": with_attentions,
            "recipe": recipe,
            "source": source or {},
        },
    }


def write_genai_config(folder: Path, config: dict) -> None:
    (Path(folder) / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
