"""Shared session fixtures: tiny random Qwen3-VL checkpoints and a cached transformers reference model.

torch and transformers' modeling code are imported inside the fixtures only, so tests that do not
use `hf_model_factory` do not pay the ~4 s import.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never reach the network: every checkpoint used in tests is written locally by make_tiny.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """make_tiny(seed=0): preset "tiny", float32, tied embeddings, 5.x-style config.json. Read-only."""
    from qwen3vl_lab.export.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "qwen3vl-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_deep_dir(tmp_path_factory) -> Path:
    """make_tiny(seed=0, preset="tiny-deep"): float32, tied, q_proj out 256 != hidden 64. Read-only."""
    from qwen3vl_lab.export.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "qwen3vl-tiny-deep", seed=0, preset="tiny-deep")


@pytest.fixture(scope="session")
def hf_model_factory():
    """`load(path)` -> transformers Qwen3VLForConditionalGeneration in float32, eager attention, eval mode.

    Cached per folder for the whole session: do not modify the returned model. It keeps
    `model.model.rope_deltas` between calls (module state, FACTS §5.4); reset it to None before a
    manual forward that does not go through `generate()`.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    cache: dict[str, object] = {}

    def load(path):
        key = str(Path(path).resolve())
        if key not in cache:
            model = Qwen3VLForConditionalGeneration.from_pretrained(
                path, dtype=torch.float32, attn_implementation="eager"
            )
            cache[key] = model.eval()
        return cache[key]

    return load


def _exported(hf_dir: Path, out: Path, precisions=("fp32",)) -> Path:
    """`qwen3vl-lab export` of a checkpoint into `out`, quietly."""
    from qwen3vl_lab.export.exporter import export

    export(hf_dir, out, list(precisions), progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_fp32_dir(tiny_dir, tmp_path_factory) -> Path:
    """`tiny_dir` exported fp32 only (no cpu-int4/). Shared read-only: copy it before changing anything."""
    return _exported(tiny_dir, tmp_path_factory.mktemp("onnx") / "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_onnx_dir(tiny_dir, tmp_path_factory) -> Path:
    """`tiny_dir` exported fp32 + int4 (the builder's recipe). Shared read-only: copy it before changing anything."""
    return _exported(tiny_dir, tmp_path_factory.mktemp("onnx") / "tiny-fp32-int4", ["fp32", "int4"])


@pytest.fixture(scope="session")
def shapes_hf_dir(tmp_path_factory) -> Path:
    """The trained shapes model's checkpoint (make-tiny --trained). Read-only."""
    from qwen3vl_lab.export.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("shapes") / "hf", preset="shapes", trained=True)


@pytest.fixture(scope="session")
def shapes_onnx_fp32_dir(shapes_hf_dir, tmp_path_factory) -> Path:
    """The trained shapes model (make-tiny --trained) exported fp32 only. Shared read-only: copy it before changing anything."""
    return _exported(shapes_hf_dir, tmp_path_factory.mktemp("shapes") / "onnx")


@pytest.fixture(scope="session")
def outliers_hf_dir(shapes_hf_dir, tmp_path_factory) -> Path:
    """The trained shapes model with activation outliers planted (make-tiny --trained --outliers; outliers.json). Read-only."""
    from qwen3vl_lab.export.outliers import plant_outliers

    return plant_outliers(shapes_hf_dir, tmp_path_factory.mktemp("outliers") / "hf").folder


@pytest.fixture(scope="session")
def outliers_onnx_fp32_dir(outliers_hf_dir, tmp_path_factory) -> Path:
    """`outliers_hf_dir` exported fp32 only. Shared read-only: copy it before changing anything."""
    return _exported(outliers_hf_dir, tmp_path_factory.mktemp("outliers") / "onnx")


# ---------------------------------------------------------------------------------------------------
# Foreign exports (tests/foreign.py): what users arrive with, built from `tiny_dir`. Shared read-only.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def guide_export_dir(tiny_dir, tmp_path_factory) -> Path:
    """The original guide's layout: cpu-fp32/ (+ qwen3vl-embedding.onnx), cpu-int4/, pytorch/ (the HF folder)."""
    from foreign import make_guide_export

    return make_guide_export(tiny_dir, tmp_path_factory.mktemp("foreign") / "guide")


@pytest.fixture(scope="session")
def genai_fp32_dir(tiny_dir, tmp_path_factory) -> Path:
    """onnxruntime-genai 0.18's builder on `tiny_dir` itself, fp32: one folder, decoder with input_ids, position_ids (3, B, S)."""
    from foreign import make_genai_export

    return make_genai_export(tiny_dir, tmp_path_factory.mktemp("foreign") / "genai-fp32", "fp32")


@pytest.fixture(scope="session")
def genai_int4_dir(tiny_dir, tmp_path_factory) -> Path:
    """The same, int4 (the builder's defaults): the tied embedding read from the int4 lm_head (GatherBlockQuantized)."""
    from foreign import make_genai_export

    return make_genai_export(tiny_dir, tmp_path_factory.mktemp("foreign") / "genai-int4", "int4")


@pytest.fixture(scope="session")
def community_export_dir(tiny_onnx_dir, tmp_path_factory) -> Path:
    """The onnx-community split emulated from `tiny_onnx_dir`: onnx/{embed_tokens,vision_encoder,decoder_model_merged}{,_q4}.onnx."""
    from foreign import make_community_export

    return make_community_export(tiny_onnx_dir, tmp_path_factory.mktemp("foreign") / "community")


@pytest.fixture(scope="session")
def renamed_export_dir(tiny_onnx_fp32_dir, tmp_path_factory) -> Path:
    """`tiny_onnx_fp32_dir` with decoder outputs present_key_values.%d.key/value."""
    from foreign import make_renamed_export

    return make_renamed_export(tiny_onnx_fp32_dir, tmp_path_factory.mktemp("foreign") / "renamed")


@pytest.fixture(scope="session")
def no_deepstack_export_dir(tiny_onnx_fp32_dir, tmp_path_factory) -> Path:
    """`tiny_onnx_fp32_dir` whose decoder has no deepstack_embeds input."""
    from foreign import make_no_deepstack_export

    return make_no_deepstack_export(tiny_onnx_fp32_dir, tmp_path_factory.mktemp("foreign") / "no-deepstack")


@pytest.fixture(scope="session")
def broken_kv_export_dir(tiny_onnx_fp32_dir, tmp_path_factory) -> Path:
    """`tiny_onnx_fp32_dir` with layer 0's present key/value swapped: decoding with the cache != recomputing."""
    from foreign import make_broken_kv_export

    return make_broken_kv_export(tiny_onnx_fp32_dir, tmp_path_factory.mktemp("foreign") / "broken-kv")


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory) -> Path:
    """A private QWEN3VL_LAB_CACHE holding the trained shapes model's export (`apps.notebook.shapes_model_dir`):
    what `demo`, `generate` without --model_dir and the notebooks use. Set it with monkeypatch.setenv."""
    from qwen3vl_lab.apps import notebook

    cache = tmp_path_factory.mktemp("lab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3VL_LAB_CACHE", str(cache))
        notebook.shapes_model_dir()
    return cache
