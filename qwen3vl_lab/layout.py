"""What an exported folder holds: its file names and the vision graph's input/output names.

    OUT/cpu-<precision>/genai_config.json        GENAI_CONFIG     onnxruntime-genai's schema only (og.Model loads it)
    OUT/cpu-<precision>/qwen3vl_lab.json         OWN_CONFIG       our settings: model config, precision, recipe, ...
    OUT/cpu-<precision>/tokenizer.json           TOKENIZER_FILE   (+ tokenizer_config.json) where onnxruntime-genai looks
    OUT/cpu-<precision>/qwen3vl-embedding.onnx   EMBEDDING_FILE   input_ids -> inputs_embeds
    OUT/cpu-<precision>/qwen3vl-embedding-genai.onnx  GENAI_EMBEDDING_FILE  input_ids, image_features -> inputs_embeds
                                                 (what onnxruntime-genai runs; same weights, no copy)
    OUT/cpu-<precision>/qwen3vl-vision.onnx      VISION_FILE      PIXEL_VALUES, ... -> IMAGE_FEATURES, DEEPSTACK_FEATURES
    OUT/cpu-<precision>/model.onnx               DECODER_FILE     the teaching decoder (steps.py)
    OUT/cpu-<precision>/model-fast.onnx          FAST_DECODER_FILE  the fused decoder (fast.py)

The builder (`export/`) writes these names and the runtime (`model.py`, `vision.py`, `fast.py`) reads
them, so they live here, on the runtime side: the runtime never imports the builder.
"""

from __future__ import annotations

GENAI_CONFIG = "genai_config.json"
OWN_CONFIG = "qwen3vl_lab.json"  # older exports kept the same settings in genai_config.json's "qwen3vl_lab" section
OWN_SECTION = "qwen3vl_lab"
TOKENIZER_FILE = "tokenizer.json"
DECODER_FILE = "model.onnx"
FAST_DECODER_FILE = "model-fast.onnx"  # written by export/decoder_fast.py beside every model.onnx
EMBEDDING_FILE = "qwen3vl-embedding.onnx"
GENAI_EMBEDDING_FILE = "qwen3vl-embedding-genai.onnx"  # reads EMBEDDING_FILE's .data; onnxruntime-genai only
GENAI_TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "chat_template.jinja")  # in each precision folder
VISION_FILE = "qwen3vl-vision.onnx"

# the vision graph's I/O names (export/vision.py writes them, also into qwen3vl_lab.json; vision.py feeds them)
PIXEL_VALUES = "pixel_values"  # (N, C*T*P*P) f32
POS_INDICES = "pos_interp_indices"  # (N, 4) i64
POS_WEIGHTS = "pos_interp_weights"  # (N, 4) f32
ROTARY_COS = "rotary_cos"  # (N, hd) f32
ROTARY_SIN = "rotary_sin"  # (N, hd) f32
IMAGE_FEATURES = "image_features"  # (N/4, out_hidden)
DEEPSTACK_FEATURES = "deepstack_features"  # (num_deepstack, N/4, out_hidden)
