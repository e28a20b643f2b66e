"""Qwen3-VL configuration: the numbers every other module needs, read from a checkpoint's config.json.

Two `config.json` styles exist in the wild and both are read here:
- transformers 4.57 (the files published on the Hub): `text_config.rope_scaling` + `rope_theta`,
  vision `model_type "qwen3_vl"`;
- transformers 5.x (`save_pretrained` today): `text_config.rope_parameters`.
See transformers' `configuration_qwen3_vl.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .jsonfile import read_json
from .paths import existing_dir, readable_file

IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653
IM_END_TOKEN_ID = 151645  # <|im_end|>: a chat turn ends here
ENDOFTEXT_TOKEN_ID = 151643  # <|endoftext|>: pad, and also an end of sequence
DEFAULT_EOS_TOKEN_IDS = (IM_END_TOKEN_ID, ENDOFTEXT_TOKEN_ID)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)  # (T, H, W) frequency channels, interleaved
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"

    @property
    def q_size(self) -> int:  # q_proj output width; 4B: 32 * 128 = 4096 != hidden 2560
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # columns of pixel_values: C * T * P * P = 1536
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def num_grid_per_side(self) -> int:  # the learned position table is a 48 x 48 grid
        return int(round(self.num_position_embeddings**0.5))


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tie_word_embeddings: bool = True
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID
    eos_token_ids: tuple[int, ...] = DEFAULT_EOS_TOKEN_IDS
    bos_token_id: int | None = None
    pad_token_id: int = ENDOFTEXT_TOKEN_ID

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "the export's qwen3vl_lab.json") -> "ModelConfig":
        """Build from a dict written by `to_dict` (our own genai_config), not from an HF config.json;
        `where` names the file in the one-line error a bad value gives."""
        text = TextConfig(**{**d["text"], "mrope_section": tuple(d["text"]["mrope_section"])})
        vis = d["vision"]
        vision = VisionConfig(**{**vis, "deepstack_visual_indexes": tuple(vis["deepstack_visual_indexes"])})
        rest = {k: v for k, v in d.items() if k not in ("text", "vision")}
        eos = rest.get("eos_token_ids", DEFAULT_EOS_TOKEN_IDS)
        rest["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else eos
        return cls(text=text, vision=vision, **rest).checked(where, "re-run `qwen3vl-lab export`")

    def checked(self, where: str, fix: str) -> "ModelConfig":
        """The numbers a model folder drives (sizes, context length, token ids) are whole numbers in range:
        a 0 context, an eos id of 10**30 or "x" is one line naming the file and the value, never a crash later."""
        t = self.text
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _whole(getattr(t, key), f"{where}: {key}", fix, low=1)
        if not isinstance(self.eos_token_ids, tuple) or not self.eos_token_ids:
            raise UserError(f"{where}: eos_token_ids is {self.eos_token_ids!r}, not a list of token ids; {fix}")
        for i in self.eos_token_ids:  # <|im_end|> and <|endoftext|> are always added: a small vocab never emits them
            _whole(i, f"{where}: eos token id", fix, low=0, high=TOKEN_ID_LIMIT)
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "pad_token_id"):
            _whole(getattr(self, key), f"{where}: {key}", fix, low=0, high=TOKEN_ID_LIMIT)
        return self


TOKEN_ID_LIMIT = 2**31  # onnxruntime-genai and tokenizers hold token ids as int32


def _whole(value, what: str, fix: str, *, low: int, high: int | None = None) -> int:
    """`value` is an int (not a bool) in [low, high); else one line naming `what`, the value and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        bound = f"a whole number >= {low}" + (f" and below {high}" if high is not None else "")
        raise UserError(f"{what} is {shown}; it must be {bound}: {fix}")
    return value


def _rope(text: dict) -> tuple[float, tuple[int, int, int]]:
    """rope_theta and mrope_section from either config style (5.x rope_parameters, 4.57 rope_scaling)."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", scaling.get("rope_theta", 5_000_000.0)))
    section = params.get("mrope_section") or scaling.get("mrope_section") or [24, 20, 20]
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "mrope"):
        raise UserError(f"rope_type {rope_type!r} is not supported; only Qwen3-VL's default interleaved MRoPE is")
    return float(theta), tuple(int(s) for s in section)


def _eos_ids(top: dict, text: dict, hf_dir: Path | None) -> tuple[int, ...]:
    """Stop on <|im_end|> and <|endoftext|> always, plus whatever the checkpoint lists."""
    ids: list[int] = list(DEFAULT_EOS_TOKEN_IDS)
    sources = [text.get("eos_token_id"), top.get("eos_token_id")]
    if hf_dir is not None and (hf_dir / "generation_config.json").is_file():
        sources.append(read_json(hf_dir / "generation_config.json",
                                 fix="restore the checkpoint's generation_config.json").get("eos_token_id"))
    for src in sources:
        for i in src if isinstance(src, list) else [src]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


TEXT_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
VISION_SIZES = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings")


def _count(section: dict, key: str, where: str, default: int | None = None) -> int:
    """A positive whole number from a config section; missing (without a default) or invalid: one line."""
    value = section.get(key)
    if value is None:
        if default is None or default < 1:
            raise UserError(f"config.json {where} has no {key}; restore the checkpoint's config.json "
                            "(it must describe the weights)")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"config.json {where}.{key} is {value!r}; it must be a whole number >= 1: restore the "
                        "checkpoint's config.json")
    return value


def parse_hf_config(cfg: dict, hf_dir: Path | None = None) -> ModelConfig:
    """Turn a Hugging Face Qwen3-VL `config.json` dict (either style) into a ModelConfig."""
    if cfg.get("model_type") != "qwen3_vl" or "text_config" not in cfg:
        kind = cfg.get("model_type", "unknown")
        raise UserError(
            f"config.json describes model_type {kind!r}, not a Qwen3-VL checkpoint (model_type 'qwen3_vl'); "
            "pass the folder of a Qwen3VLForConditionalGeneration checkpoint"
        )
    t, v = cfg["text_config"], cfg.get("vision_config") or {}
    if not isinstance(t, dict) or not isinstance(v, dict):
        raise UserError("config.json: text_config / vision_config must be JSON objects; restore the checkpoint's "
                        "config.json")
    theta, section = _rope(t)
    size = {k: _count(t, k, "text_config") for k in TEXT_SIZES}
    heads, hidden = size["num_attention_heads"], size["hidden_size"]
    kv_heads = _count(t, "num_key_value_heads", "text_config", heads)
    if heads % kv_heads:
        raise UserError(f"config.json text_config: num_attention_heads {heads} is not a multiple of "
                        f"num_key_value_heads {kv_heads}; restore the checkpoint's config.json")
    for k in VISION_SIZES:
        if k in v:
            _count(v, k, "vision_config")
    text = TextConfig(
        vocab_size=size["vocab_size"],
        hidden_size=hidden,
        intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=_count(t, "head_dim", "text_config", hidden // heads),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        mrope_section=section,
        max_position_embeddings=t.get("max_position_embeddings", 262144),
        hidden_act=t.get("hidden_act", "silu"),
    )
    if 2 * sum(section) != text.head_dim:
        raise UserError(f"mrope_section {list(section)} must sum to head_dim/2 = {text.head_dim // 2}; fix config.json")
    vp = v.get("rope_parameters") or {}
    vision = VisionConfig(
        depth=v.get("depth", 27),
        hidden_size=v.get("hidden_size", 1152),
        intermediate_size=v.get("intermediate_size", 4304),
        num_heads=v.get("num_heads", 16),
        in_channels=v.get("in_channels", 3),
        patch_size=v.get("patch_size", 16),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        out_hidden_size=v.get("out_hidden_size", text.hidden_size),
        num_position_embeddings=v.get("num_position_embeddings", 2304),
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        rope_theta=float(vp.get("rope_theta", 10000.0)),
    )
    tie = cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
    bos = t.get("bos_token_id", cfg.get("bos_token_id"))
    return ModelConfig(
        text=text,
        vision=vision,
        tie_word_embeddings=bool(tie),
        image_token_id=cfg.get("image_token_id", IMAGE_TOKEN_ID),
        video_token_id=cfg.get("video_token_id", VIDEO_TOKEN_ID),
        vision_start_token_id=cfg.get("vision_start_token_id", VISION_START_TOKEN_ID),
        vision_end_token_id=cfg.get("vision_end_token_id", VISION_END_TOKEN_ID),
        eos_token_ids=_eos_ids(cfg, t, hf_dir),
        bos_token_id=bos if isinstance(bos, int) else None,
    ).checked(f"{hf_dir / 'config.json' if hf_dir else 'config.json'}", "restore the checkpoint's config.json")


def load_hf_config(hf_dir: str | Path) -> ModelConfig:
    """Read `<hf_dir>/config.json`; a one-line UserError when it is missing, unreadable or not Qwen3-VL."""
    fix = "pass --hf_dir the folder of a Hugging Face Qwen3-VL checkpoint"
    hf_dir = existing_dir(hf_dir, "--hf_dir", fix=fix)
    path = hf_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json; {fix}")
    readable_file(path)
    cfg = read_json(path, fix="restore the checkpoint's config.json")
    return parse_hf_config(cfg, hf_dir)
