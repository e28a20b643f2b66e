"""Write a random-weight Qwen3-VL checkpoint in the exact Hugging Face layout, without torch.

`make_tiny(folder)` writes, in a second or two, a folder that
`transformers.Qwen3VLForConditionalGeneration.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` load offline:

    config.json                   built by transformers' Qwen3VLConfig (5.x style, or the Hub's 4.57 style)
    generation_config.json        the Instruct model's: eos [151645, 151643], sampling on
    model.safetensors             (or model-0000i-of-0000N.safetensors + model.safetensors.index.json)
    preprocessor_config.json      the real Qwen3-VL image-processor values (patch 16, mean/std 0.5, ...)
    video_preprocessor_config.json
    vocab.json, merges.txt, tokenizer_config.json, chat_template.json, PROVENANCE.md   (real Qwen tokenizer)

The vocabulary is the real one (151936 rows), so the real special-token ids work. Every tensor,
biases and norm weights included, is random from `np.random.default_rng(seed)`, so a port that drops
a bias or uses `1 + weight` disagrees with transformers. Weights have std 0.1 ("tiny") or 0.15
("tiny-deep"): with 0.02 greedy decoding repeats one token forever.

Presets: "tiny" (~39 MB fp32), "tiny-deep" (other head counts, head_dim 32, vision
depth 4 with deepstack [1, 3]), "2b" (the real Qwen3-VL-2B shapes, 2.1 B parameters, bf16 by default;
written one tensor at a time so it needs about 1.5 GB of RAM) and "4b" (the real Qwen3-VL-4B shapes: text
2560 wide, 36 layers, 32 q / 8 kv heads, the 2B's vision tower with out_hidden 2560; 4.44 B parameters,
8.3 GiB in bf16, written the same way).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..config import ENDOFTEXT_TOKEN_ID, IM_END_TOKEN_ID, ModelConfig, parse_hf_config
from ..errors import UserError
from ..paths import output_dir as checked_output_dir
from .checkpoint import SAVE_DTYPES, Checkpoint, LazyTensor, save_checkpoint_weights
from .files import check_replaceable, replace_folder, staging_folder
from .outliers import OutlierPlan, plant_outliers

CONFIG_STYLES = ("v5", "legacy")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json", "PROVENANCE.md")
BIAS_STD = 0.05  # biases: small but far above any parity tolerance
NORM_STD = 0.1  # norm weights: 1 + N(0, NORM_STD)


@dataclass(frozen=True)
class Preset:
    """Config kwargs for transformers' Qwen3VLTextConfig / Qwen3VLVisionConfig, the weight std, default dtype."""

    text: dict
    vision: dict
    init_std: float = 0.1
    dtype: str = "float32"
    description: str = ""
    image_pixels: int | None = None  # preprocessor size (min = max pixels); None = the real Qwen3-VL values


def _rope(theta: float, section: list[int]) -> dict:
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": section, "mrope_interleaved": True}


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        description="10.1 M params (9.7 M of them the embedding)",
        text=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
                  rope_parameters=_rope(5_000_000.0, [4, 2, 2])),
        vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    num_position_embeddings=2304, deepstack_visual_indexes=[0, 1, 2]),
    ),
    "tiny-deep": Preset(
        description="other shapes: q_proj out 256 != hidden 64, head_dim 32, uneven mrope, 4 vision blocks, deepstack [1, 3]",
        init_std=0.15,  # with 0.1 greedy output of this preset often repeats one token
        text=dict(vocab_size=151936, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
                  rope_parameters=_rope(1_000_000.0, [6, 5, 5])),
        vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                    num_position_embeddings=2304, deepstack_visual_indexes=[1, 3]),
    ),
    "shapes": Preset(
        description="the shapes-task model (qwen3vl_lab/shapes.py): 96x96 images = 9 tokens; `trained=True` "
                    "gives the weights trained by `qwen3vl-lab train-shapes`",
        init_std=0.02,
        image_pixels=96 * 96,
        text=dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
                  rope_parameters=_rope(5_000_000.0, [6, 5, 5])),
        vision=dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=2, out_hidden_size=128,
                    num_position_embeddings=2304, deepstack_visual_indexes=[0, 1]),
    ),
    "2b": Preset(
        description="the real Qwen3-VL-2B-Instruct shapes, random weights: 2.13 B params",
        init_std=0.02,
        dtype="bfloat16",
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_parameters=_rope(5_000_000.0, [24, 20, 20])),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
    ),
    "4b": Preset(
        description="the real Qwen3-VL-4B-Instruct shapes (FACTS §2.2), random weights: 4.44 B params",
        init_std=0.02,
        dtype="bfloat16",
        text=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rope_parameters=_rope(5_000_000.0, [24, 20, 20])),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                    num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
    ),
}

# What the Qwen3-VL Hub repos ship, as transformers 5.24 writes it.
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "merge_size": 2,
    "patch_size": 16,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "temporal_patch_size": 2,
}
VIDEO_PREPROCESSOR_CONFIG = {
    "fps": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "max_frames": 768,
    "merge_size": 2,
    "min_frames": 4,
    "patch_size": 16,
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "temporal_patch_size": 2,
    "video_processor_type": "Qwen3VLVideoProcessor",
}
# Qwen3-VL-*-Instruct generation_config.json. Sampling is on: pass do_sample=False for greedy.
GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT_TOKEN_ID,
    "do_sample": True,
    "eos_token_id": [IM_END_TOKEN_ID, ENDOFTEXT_TOKEN_ID],
    "pad_token_id": ENDOFTEXT_TOKEN_ID,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
}


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------

def hf_config_dict(preset: str = "tiny", dtype: str | None = None, tie_word_embeddings: bool = True,
                   config_style: str = "v5") -> dict:
    """The config.json contents for a preset, as transformers' `Qwen3VLConfig.to_json_file` writes them.

    transformers is imported here, not at module import: with torch installed, importing its
    configuration module also imports torch (transformers/modeling_rope_utils.py).
    """
    from transformers import Qwen3VLConfig  # noqa: PLC0415 (imports torch: only here)

    p = _preset(preset)
    text = {**p.text, "initializer_range": p.init_std, "bos_token_id": ENDOFTEXT_TOKEN_ID,
            "eos_token_id": IM_END_TOKEN_ID}
    vision = {**p.vision, "initializer_range": p.init_std}
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tie_word_embeddings,
        architectures=["Qwen3VLForConditionalGeneration"],
        dtype=dtype or p.dtype,
    )
    d = json.loads(config.to_json_string())
    return to_legacy_config(d) if config_style == "legacy" else d


def to_legacy_config(d: dict) -> dict:
    """Rewrite a 5.x config.json dict into the form on the Hub (transformers 4.57).

    text_config: rope_parameters -> rope_scaling (without rope_theta) + rope_theta, tie_word_embeddings
    repeated; vision_config: model_type "qwen3_vl", no rope_parameters; dtype -> torch_dtype.
    """
    d = json.loads(json.dumps(d))  # deep copy
    text, vision = d["text_config"], d["vision_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = _json_number(rope.pop("rope_theta"))
    text["rope_scaling"] = rope
    text["tie_word_embeddings"] = d["tie_word_embeddings"]
    text.pop("pad_token_id", None)
    vision["model_type"] = "qwen3_vl"
    vision.pop("rope_parameters", None)
    if "dtype" in d:
        d["torch_dtype"] = d.pop("dtype")
    d["transformers_version"] = "4.57.0.dev0"
    return d


def _json_number(x: float) -> int | float:
    """5000000.0 -> 5000000, as the Hub files write rope_theta."""
    return int(x) if float(x).is_integer() else x


def _write_json(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------

def expected_parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor transformers' `save_pretrained` writes for this config, name -> shape.

    Linear weights are [out, in]. `lm_head.weight` only when the embeddings are not tied.
    """
    t, v = cfg.text, cfg.vision
    shapes: dict[str, tuple[int, ...]] = {}
    shapes.update(_vision_shapes(v))
    h = t.hidden_size
    shapes["model.language_model.embed_tokens.weight"] = (t.vocab_size, h)
    for i in range(t.num_hidden_layers):
        p = f"model.language_model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (t.q_size, h)
        shapes[p + "self_attn.k_proj.weight"] = (t.kv_size, h)
        shapes[p + "self_attn.v_proj.weight"] = (t.kv_size, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, t.q_size)
        shapes[p + "self_attn.q_norm.weight"] = (t.head_dim,)
        shapes[p + "self_attn.k_norm.weight"] = (t.head_dim,)
        shapes[p + "mlp.gate_proj.weight"] = (t.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (t.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, t.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.language_model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, h)
    return shapes


def _vision_shapes(v) -> dict[str, tuple[int, ...]]:
    d, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    p = "model.visual."
    shapes = {
        p + "patch_embed.proj.weight": (d, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        p + "patch_embed.proj.bias": (d,),
        p + "pos_embed.weight": (v.num_position_embeddings, d),
    }
    for i in range(v.depth):
        b = f"{p}blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[f"{b}{norm}.weight"] = shapes[f"{b}{norm}.bias"] = (d,)
        shapes.update(_linear(b + "attn.qkv", 3 * d, d))
        shapes.update(_linear(b + "attn.proj", d, d))
        shapes.update(_linear(b + "mlp.linear_fc1", v.intermediate_size, d))
        shapes.update(_linear(b + "mlp.linear_fc2", d, v.intermediate_size))
    # The final merger normalises each patch (width d) before the 2x2 concat; DeepStack mergers after (4d).
    mergers = [("merger.", d)] + [(f"deepstack_merger_list.{j}.", merged) for j in range(len(v.deepstack_visual_indexes))]
    for prefix, norm_width in mergers:
        shapes[f"{p}{prefix}norm.weight"] = shapes[f"{p}{prefix}norm.bias"] = (norm_width,)
        shapes.update(_linear(f"{p}{prefix}linear_fc1", merged, merged))
        shapes.update(_linear(f"{p}{prefix}linear_fc2", v.out_hidden_size, merged))
    return shapes


def _linear(name: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    return {name + ".weight": (out, inp), name + ".bias": (out,)}


def _init_kind(name: str) -> str:
    """"norm" (1 + noise), "bias" (small noise) or "weight" (N(0, std))."""
    if "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
        return "norm"
    if name.endswith(".bias"):
        return "bias"
    return "weight"


def random_tensors(cfg: ModelConfig, seed: int = 0, init_std: float = 0.1) -> dict[str, LazyTensor]:
    """Lazy random tensors for every parameter: each is made only when written (bounded memory).

    Tensor i draws from the i-th child of `np.random.default_rng(seed)` (`Generator.spawn`), so its
    values do not depend on the order tensors are written in, or on sharding.
    """
    shapes = expected_parameter_shapes(cfg)
    children = np.random.default_rng(seed).spawn(len(shapes))
    return {
        name: LazyTensor(shape, _maker(rng, shape, _init_kind(name), init_std))
        for rng, (name, shape) in zip(children, shapes.items())
    }


def _maker(rng: np.random.Generator, shape: tuple[int, ...], kind: str, init_std: float):
    def make() -> np.ndarray:
        x = rng.standard_normal(shape, dtype=np.float32)
        if kind == "norm":
            x *= NORM_STD
            x += 1.0
        else:
            x *= BIAS_STD if kind == "bias" else init_std
        return x

    return make


# ----------------------------------------------------------------------------------------------
# the folder
# ----------------------------------------------------------------------------------------------

def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _check_args(preset: str, dtype: str | None, config_style: str, seed: int) -> None:
    _preset(preset)
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(SAVE_DTYPES)}")
    if config_style not in CONFIG_STYLES:
        raise UserError(f"config_style {config_style!r} is unknown; use 'v5' (transformers 5.x) or 'legacy' (Hub, 4.57)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")


def _check_target(output_dir: Path, overwrite: bool) -> None:
    """A new or empty folder; with overwrite, also a folder make_tiny wrote (never one holding the user's files)."""
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output_dir} already exists and is not empty; pick a new folder, or pass "
                        "--overwrite to replace a checkpoint make-tiny wrote")
    check_replaceable(output_dir)


def _checkpoint_bytes(preset: str, dtype: str, tie: bool) -> int:
    """Bytes of the weights make_tiny writes (the tokenizer and configs add about 12 MB)."""
    cfg = parse_hf_config(hf_config_dict(preset, dtype, tie, "v5"))
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    return sum(int(np.prod(shape)) for shape in expected_parameter_shapes(cfg).values()) * itemsize + 12 * 2**20


def copy_tokenizer_files(dest: Path) -> None:
    """Copy the real Qwen tokenizer shipped in `qwen3vl_lab/data/tokenizer/` into `dest`."""
    src = resources.files("qwen3vl_lab") / "data" / "tokenizer"
    for name in TOKENIZER_FILES:
        (dest / name).write_bytes((src / name).read_bytes())


def preprocessor_config(preset: str = "tiny") -> dict:
    """preprocessor_config.json: the real Qwen3-VL values, with the preset's pixel budget if it has one."""
    pixels = _preset(preset).image_pixels
    if pixels is None:
        return dict(PREPROCESSOR_CONFIG)
    return {**PREPROCESSOR_CONFIG, "size": {"longest_edge": pixels, "shortest_edge": pixels}}


def _write_folder(folder: Path, preset: str, seed: int, dtype: str, config_style: str, tie: bool,
                  max_shard_bytes: int | None) -> None:
    """Write every file of the checkpoint into `folder` (which exists and is empty)."""
    config = hf_config_dict(preset, dtype, tie, config_style)
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {**GENERATION_CONFIG, "transformers_version": config["transformers_version"]})
    _write_json(folder / "preprocessor_config.json", preprocessor_config(preset))
    _write_json(folder / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG)
    copy_tokenizer_files(folder)
    tensors = random_tensors(parse_hf_config(config), seed, _preset(preset).init_std)
    save_checkpoint_weights(folder, tensors, dtype, max_shard_bytes)


# ----------------------------------------------------------------------------------------------
# the trained "shapes" model (qwen3vl_lab/data/shapes_model, written by `qwen3vl-lab train-shapes`)
# ----------------------------------------------------------------------------------------------

TRAINED_PRESET = "shapes"
TRAINED_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "model.safetensors", "TRAINING.md", "training.json")


def trained_model_dir():
    """The shipped trained checkpoint's folder inside the package (no tokenizer files: copied at make time)."""
    return resources.files("qwen3vl_lab") / "data" / "shapes_model"


def _write_trained_folder(folder: Path, dtype: str | None, config_style: str, tie: bool,
                          max_shard_bytes: int | None) -> None:
    """Copy the shipped trained checkpoint (+ the shipped tokenizer); re-encode weights only if asked."""
    src = trained_model_dir()
    if not (src / "model.safetensors").is_file():
        raise UserError("this installation has no trained shapes model (qwen3vl_lab/data/shapes_model); "
                        "reinstall the package or train one with `qwen3vl-lab train-shapes`")
    if not tie:
        raise UserError("the trained shapes model ties its embeddings; drop --untied / tie_word_embeddings=False")
    for name in TRAINED_FILES:
        if (src / name).is_file():
            (folder / name).write_bytes((src / name).read_bytes())
    copy_tokenizer_files(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    stored = config.get("dtype", config.get("torch_dtype"))
    if (dtype is not None and dtype != stored) or max_shard_bytes is not None:
        ckpt = Checkpoint.open(src / "model.safetensors")
        tensors = {n: LazyTensor(ckpt.info(n).shape, (lambda n=n: ckpt.get(n))) for n in ckpt.names()}
        (folder / "model.safetensors").unlink()
        save_checkpoint_weights(folder, tensors, dtype or stored, max_shard_bytes)
        config["dtype"] = dtype or stored
    if config_style == "legacy":
        config = to_legacy_config(config)
    _write_json(folder / "config.json", config)


def make_tiny(
    output_dir: str | Path,
    seed: int = 0,
    *,
    preset: str = "tiny",
    dtype: str | None = None,
    config_style: str = "v5",
    tie_word_embeddings: bool = True,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    trained: bool = False,
    outliers: bool | OutlierPlan = False,
) -> Path:
    """Write a random-weight Qwen3-VL checkpoint folder in the Hugging Face layout and return its path.

    preset: "tiny", "tiny-deep", "shapes", "2b" or "4b" (see PRESETS). dtype: "float32" / "bfloat16" /
    "float16"; None means the preset's (float32, bf16 for "2b" and "4b"). config_style: "v5" (what transformers 5.x
    writes) or "legacy" (the Hub's 4.57 form). max_shard_bytes: shard like `save_pretrained`.
    The folder is built next to `output_dir` under a temporary name, then renamed into place; an
    existing non-empty folder is only replaced with overwrite=True.

    trained=True (preset "shapes" only): the weights trained on the shapes task (qwen3vl_lab/shapes.py)
    that ship with the package, bf16 unless another dtype is asked for; seed is then unused.

    outliers=True (or an `OutlierPlan`): activation outliers planted by an exactly function-preserving
    rescaling (export/outliers.py), recorded in `outliers.json`: fp32 answers stay the same, INT4 breaks.
    """
    _check_args(preset, dtype, config_style, seed)
    if trained and preset != TRAINED_PRESET:
        raise UserError(f"trained weights exist only for preset {TRAINED_PRESET!r}, not {preset!r}; "
                        "leave out --preset")
    if outliers is not False and not trained:
        raise UserError("--outliers plants outliers in the trained shapes model (an untrained one has no answers to "
                        "lose); add --trained")
    output_dir = checked_output_dir(output_dir, "--output_dir")
    _check_target(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    weights_dtype = dtype or _preset(preset).dtype
    estimate = _checkpoint_bytes(preset, weights_dtype, tie_word_embeddings)
    with staging_folder(output_dir.parent, f".{output_dir.name}.tmp-", shown=output_dir, estimate=estimate) as tmp:
        if trained:
            _write_trained_folder(tmp, dtype, config_style, tie_word_embeddings, max_shard_bytes)
        else:
            _write_folder(tmp, preset, int(seed), weights_dtype, config_style, tie_word_embeddings, max_shard_bytes)
        if outliers is not False:  # planted from the staged copy straight into place (its own staging folder)
            plant_outliers(tmp, output_dir, None if outliers is True else outliers, overwrite=overwrite)
            return output_dir
        replace_folder(tmp, output_dir, what="make-tiny checkpoint")
    return output_dir
