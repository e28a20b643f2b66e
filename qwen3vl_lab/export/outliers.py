"""Plant activation outliers in a Qwen3-VL checkpoint, without changing a single fp32 answer.

    planted = plant_outliers("models/shapes", "models/shapes-outliers")      # the shapes model, outliers planted
    planted.sites[0]            # PlantedSite(layer=0, kind="attn_in", channels=(...), scale=1024.0, ...)
    planted.consumers()         # the weights whose input carries outliers: q/k/v, gate/up, down_proj
    read_planted("models/shapes-outliers")                               # the same record, from outliers.json

(CLI: `qwen3vl-lab make-tiny --trained --outliers --output_dir DIR`.)

Real LLMs carry a few *fixed* channels whose activations are 20-1000x (up to 10^4x) larger than the rest
(LLM.int8(); SmoothQuant; Sun et al., "Massive activations in large language models"): on the RMSNorm
outputs that feed q/k/v and gate/up, on the same hidden channels layer after layer, and at the MLP's
down_proj input (the product act(gate) * up), where the largest ones live. Weight-only INT4 breaks on
them: in a block of 32 weights along K, the weights those channels multiply are no larger than the
others, so the block's scale hides nothing -- but the activation multiplies their rounding error by
100x. And accuracy_level 4 (int8 activations, per-block absmax / 127) rounds every other channel of
the outlier's block to zero.

The planting is an exactly function-preserving rescaling by a power of two s on chosen channels c:

    attn_in  (layer i):  input_layernorm.weight[c] * s           q/k/v_proj.weight[:, c] / s
    mlp_in   (layer i):  post_attention_layernorm.weight[c] * s  gate/up_proj.weight[:, c] / s
    down_in  (layer i):  up_proj.weight[c, :] * s                down_proj.weight[:, c] / s

Each product x_c * w_c is unchanged bit for bit (scaling by 2^k only moves the exponent, in fp32 and in
bf16 alike), so fp32 answers are token for token the same; only the split between activation and weight
moves. The channels are the ones the model relies on most (`salience`: norm weight x the consumers' column
norms), as real outliers are (zeroing them breaks a real LLM); the norm channels are the same in every layer
(as the massive-activation channels are), the down_proj channels are each layer's own.

Why INT4 breaks on it: the consumers' weights on those channels are now ~s times smaller than their block
neighbours, so INT4 rounds them to zero and the channel's whole contribution is lost (even at
accuracy_level 0); at accuracy_level 4 the int8 rounding of the activations, per block of 32 along K with
scale absmax / 127, also zeroes every ordinary channel that shares a block with an outlier.

Where this simplifies: real outliers come from training and vary with the token (the first token and
delimiters carry the largest ones; "attention sinks"), and their weights are not exactly the ordinary
weights divided by s; here every token carries them by construction, through the norm weight. The lm_head
input (the final norm) is left alone: its weight is tied to the embeddings. The vision tower is untouched.

`outliers.json` beside the weights is the ground truth the tests (and the doctor's tests) check against:
which layers, which weight is scaled up, which weights consume the scaled channels, the channels, s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..paths import output_dir as checked_output_dir
from .checkpoint import INDEX_NAME, SAVE_DTYPES, Checkpoint, LazyTensor, save_checkpoint_weights
from .decoder import PREFIX
from .files import check_replaceable, replace_folder, staging_folder

OUTLIERS_FILE = "outliers.json"
KINDS = ("attn_in", "mlp_in", "down_in")
MAX_COPIED_FILES = 64  # a checkpoint folder has a dozen files; more is not a checkpoint we made
_STORED = {v: k for k, v in SAVE_DTYPES.items()}  # "BF16" -> "bfloat16"


@dataclass(frozen=True)
class OutlierPlan:
    """What to plant: `channels` hidden channels at the norm outputs (the same in every layer), `mlp_channels`
    intermediate channels at each down_proj input; scales are powers of two (2**exponent)."""

    channels: int = 4
    mlp_channels: int = 8
    norm_exponent: int = 10  # s = 1024 at the RMSNorm outputs feeding q/k/v and gate/up
    down_exponent: int = 12  # s = 4096 at the down_proj inputs (where real models carry the largest)
    layers: tuple[int, ...] | None = None  # None: every decoder layer

    def validate(self, num_layers: int, hidden: int, intermediate: int) -> "OutlierPlan":
        if not 0 <= self.channels <= hidden // 4 or not 0 <= self.mlp_channels <= intermediate // 4:
            raise UserError(f"plant at most a quarter of the channels ({hidden // 4} hidden, {intermediate // 4} "
                            f"intermediate), got {self.channels} and {self.mlp_channels}")
        for e in (self.norm_exponent, self.down_exponent):
            if not 1 <= e <= 16:
                raise UserError(f"scale exponents must be 1..16 (s = 2..65536), got {e}")
        bad = [i for i in (self.layers or ()) if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"layers {bad} do not exist; the decoder has layers 0..{num_layers - 1}")
        return self


@dataclass(frozen=True)
class PlantedSite:
    """One planted site: `scaled` (entries on `channels`) x scale, each of `consumers` (input columns) / scale."""

    layer: int
    kind: str  # "attn_in", "mlp_in" or "down_in"
    scaled: str  # the weight multiplied: a norm weight, or up_proj (rows)
    consumers: tuple[str, ...]  # the Linear weights whose inputs carry the outliers (HF names, = ONNX initializers)
    channels: tuple[int, ...]
    scale: float


@dataclass
class Planted:
    """What `plant_outliers` wrote: the folder, the plan, and every site (also in `folder/outliers.json`)."""

    folder: Path
    plan: OutlierPlan
    sites: list[PlantedSite] = field(default_factory=list)

    def consumers(self) -> dict[str, tuple[int, ...]]:
        """weight name -> the input channels that carry outliers (each weight's input is one site's)."""
        return {w: s.channels for s in self.sites for w in s.consumers}

    def to_json(self) -> dict:
        return {"kind": "qwen3vl-lab planted activation outliers", "plan": asdict(self.plan),
                "sites": [asdict(s) for s in self.sites]}


def read_planted(folder: str | Path) -> Planted:
    """The record `plant_outliers` left in `folder/outliers.json`."""
    path = Path(folder) / OUTLIERS_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {OUTLIERS_FILE}; it was not written by plant_outliers / make-tiny --outliers")
    d = json.loads(path.read_text(encoding="utf-8"))
    plan = d["plan"]
    plan = OutlierPlan(**{**plan, "layers": None if plan["layers"] is None else tuple(plan["layers"])})
    sites = [PlantedSite(**{**s, "consumers": tuple(s["consumers"]), "channels": tuple(s["channels"])})
             for s in d["sites"]]
    return Planted(Path(folder), plan, sites)


# -- the plan, on a checkpoint's names ------------------------------------------------------------
def layer_sites(layer: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, the weight before, its consumers) of the three sites of one decoder layer (HF names): what a
    planting scales and what an equalisation (debug/repair.py) scales back."""
    p = f"{PREFIX}.layers.{layer}."
    return [("attn_in", p + "input_layernorm.weight", tuple(f"{p}self_attn.{x}_proj.weight" for x in "qkv")),
            ("mlp_in", p + "post_attention_layernorm.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
            ("down_in", p + "mlp.up_proj.weight", (p + "mlp.down_proj.weight",))]


def salience(weight, kind: str, scaled: str, consumers: tuple[str, ...]) -> np.ndarray:
    """(channels,) how much of the layer's signal goes through each input channel of a site, from the weights
    alone: |norm weight| (or |gate row| x |up row| at down_proj's input) x the consumers' column norms."""
    cols = np.sqrt(sum((weight(w) ** 2).sum(axis=0) for w in consumers))  # HF Linear (out, in): column k = input k
    if kind == "down_in":
        gate = scaled.replace("up_proj", "gate_proj")
        return np.linalg.norm(weight(scaled), axis=1) * np.linalg.norm(weight(gate), axis=1) * cols
    return np.abs(weight(scaled)) * cols


def _top(score: np.ndarray, k: int) -> tuple[int, ...]:
    return tuple(sorted(int(c) for c in np.argsort(-score, kind="stable")[:k]))


def plan_sites(plan: OutlierPlan, weight, num_layers: int) -> list[PlantedSite]:
    """Every site of `plan` (weight: HF name -> float32 array). Outliers sit on the channels the model relies on
    most, as real ones do (zeroing them breaks a real LLM: Sun et al.): the norm channels are the most salient
    summed over layers (one set, fixed across layers), down_proj's the most salient of each layer."""
    layers = range(num_layers) if plan.layers is None else sorted(set(plan.layers))
    norm_score = sum(salience(weight, kind, scaled, consumers)
                     for i in range(num_layers) for kind, scaled, consumers in layer_sites(i)[:2])
    norm_channels = _top(norm_score, plan.channels)
    s_norm, s_down = float(2 ** plan.norm_exponent), float(2 ** plan.down_exponent)
    sites = []
    for i in layers:
        for kind, scaled, consumers in layer_sites(i):
            if kind == "down_in":
                channels, scale = _top(salience(weight, kind, scaled, consumers), plan.mlp_channels), s_down
            else:
                channels, scale = norm_channels, s_norm
            if channels:
                sites.append(PlantedSite(i, kind, scaled, consumers, channels, scale))
    return sites


def _scalings(sites: list[PlantedSite]) -> dict[str, list[tuple[int, np.ndarray, float]]]:
    """weight name -> [(axis, channels, factor)]: what to multiply where. Norm weights (1-D) and up_proj rows
    (axis 0) are multiplied by s; consumer input columns (axis 1 of an HF Linear (out, in)) divided by s."""
    out: dict[str, list] = {}
    for s in sites:
        out.setdefault(s.scaled, []).append((0, np.asarray(s.channels), s.scale))
        for w in s.consumers:
            out.setdefault(w, []).append((1, np.asarray(s.channels), 1.0 / s.scale))
    return out


def _rescaled(ckpt: Checkpoint, name: str, ops: list[tuple[int, np.ndarray, float]]) -> LazyTensor:
    def make() -> np.ndarray:
        w = ckpt.get(name)  # float32 (bf16 on disk widens exactly)
        for axis, channels, factor in ops:
            if axis == 0:
                w[channels] *= np.float32(factor)  # a power of two: exact
            else:
                w[:, channels] *= np.float32(factor)
        return w

    return LazyTensor(ckpt.shape(name), make)


def _copy_other_files(src: Path, dst: Path) -> None:
    """Every regular file of the checkpoint folder except its weights (configs, tokenizer, README): never a
    symlink (it could point outside the folder), never a sub-folder."""
    files = [p for p in src.iterdir() if p.is_file() and not p.is_symlink()
             and not p.name.endswith(".safetensors") and p.name not in (INDEX_NAME, OUTLIERS_FILE)]
    if len(files) > MAX_COPIED_FILES:
        raise UserError(f"{src} holds {len(files)} files; a Hugging Face checkpoint folder has a few dozen at most")
    for p in files:
        (dst / p.name).write_bytes(p.read_bytes())


def _dimensions(src: Path) -> tuple[int, int, int]:
    from ..config import parse_hf_config  # noqa: PLC0415 (runtime config reader)

    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    t = parse_hf_config(config).text
    return t.num_hidden_layers, t.hidden_size, t.intermediate_size


def plant_outliers(hf_dir: str | Path, output_dir: str | Path, plan: OutlierPlan | None = None, *,
                   overwrite: bool = False) -> Planted:
    """Copy the checkpoint `hf_dir` to `output_dir` with activation outliers planted (see the module docstring);
    the weights keep their stored dtype. Returns the record, also written to `output_dir/outliers.json`."""
    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; pass a Hugging Face Qwen3-VL checkpoint folder")
    num_layers, hidden, intermediate = _dimensions(src)
    plan = (plan or OutlierPlan()).validate(num_layers, hidden, intermediate)
    out = checked_output_dir(output_dir, "--output_dir")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {out} already exists and is not empty; pick a new folder, or pass --overwrite")
    check_replaceable(out)
    ckpt = Checkpoint.open(src)
    needed = {w for i in range(num_layers) for _, scaled, consumers in layer_sites(i) for w in (scaled, *consumers)}
    missing = sorted(needed - set(ckpt.names()))
    if missing:
        raise UserError(f"{src} lacks {missing[0]} (and {len(missing) - 1} more); plant outliers in a Qwen3-VL checkpoint")
    sites = plan_sites(plan, ckpt.get, num_layers)
    scalings = _scalings(sites)
    dtypes = {ckpt.dtype(n) for n in ckpt.names()}
    dtype = _STORED.get(dtypes.pop()) if len(dtypes) == 1 else "float32"
    tensors = {n: _rescaled(ckpt, n, scalings[n]) if n in scalings else LazyTensor(ckpt.shape(n), lambda n=n: ckpt.get(n))
               for n in ckpt.names()}
    planted = Planted(out, plan, sites)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out.parent, f".{out.name}.tmp-", shown=out) as tmp:
        _copy_other_files(src, tmp)
        save_checkpoint_weights(tmp, tensors, dtype or "float32")
        (tmp / OUTLIERS_FILE).write_text(json.dumps(planted.to_json(), indent=2) + "\n", encoding="utf-8")
        replace_folder(tmp, out, what="checkpoint with planted outliers")
    return planted


__all__ = ["KINDS", "OUTLIERS_FILE", "OutlierPlan", "Planted", "PlantedSite", "layer_sites", "plan_sites", "plant_outliers",
           "read_planted", "salience"]
