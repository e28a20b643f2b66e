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

# -- the text decoder's graph I/O ---------------------------------------------------------------
# `decoder.DecoderIO.read` finds these in any decoder graph and is the only reader; the builder writes
# ours. Other exporters' spellings are listed too: onnxruntime-genai and the original guide's builder
# take `inputs_embeds` (or `input_ids`) and write `present.%d.key`; the guide's text documents
# `present_key_values.%d.key`; transformers.js / onnx-community decoders add `num_logits_to_keep` and
# `use_cache_branch`.
INPUT_IDS = "input_ids"  # (B, S) int64, a decoder that embeds tokens itself (or the embedding model's input)
INPUTS_EMBEDS = "inputs_embeds"  # (B, S, H) f32
POSITION_IDS = "position_ids"  # (3, B, S) int64 (MRoPE t/h/w), or (B, S) for 1-D rotary positions
ATTENTION_MASK = "attention_mask"  # (B, past + S) int64
DEEPSTACK_EMBEDS = "deepstack_embeds"  # (D, B, S, H) f32, added after the first D decoder layers
LOGITS_TO_KEEP = ("logits_to_keep", "num_logits_to_keep")  # () int64: 0 = all positions, k = the last k
USE_CACHE_BRANCH = "use_cache_branch"  # (1,) bool in merged onnx-community decoders
LOGITS = "logits"  # (B, S or k, V)
PAST_KV = r"past_key_values\.(\d+)\.(key|value)"  # (B, kv_heads, past, head_dim)
PRESENT_KV = (r"present\.(\d+)\.(key|value)", r"present_key_values\.(\d+)\.(key|value)")
ATTENTIONS = r"attentions\.(\d+)"  # (B, heads, S, past + S), `export --with_attentions`
# the fused decoder's own inputs (export/decoder_fast.py writes them, fast.py binds them)
COS_CACHE, SIN_CACHE = "cos_cache", "sin_cache"  # (capacity, head_dim / 2) f32
SEQLENS_K = "seqlens_k"  # (B,) int32: total length - 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # () int32

# the embedding model's I/O (ours, the guide's and onnx-community's embed_tokens)
EMBEDDING_INPUT, EMBEDDING_OUTPUT = INPUT_IDS, INPUTS_EMBEDS


def past_names(layer: int) -> tuple[str, str]:
    """Our decoders' past key/value input names of one layer."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """Our decoders' present key/value output names of one layer."""
    return f"present.{layer}.key", f"present.{layer}.value"


def attention_name(layer: int) -> str:
    """Our decoders' attention-probabilities output of one layer (`export --with_attentions`)."""
    return f"attentions.{layer}"
