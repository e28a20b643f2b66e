"""Helpers the teaching notebooks share: which model folder to use, made once and cached.

    from qwen3vl_lab.apps import notebook
    model = notebook.open_model()        # MODEL_DIR, else HF_DIR exported once, else the tiny checkpoint
    notebook.describe()                  # one line saying which of the three it is
    model = notebook.open_model(default="shapes")  # ... else the trained shapes model (notebooks 04-06)

- `MODEL_DIR=/path/to/export` uses an exported folder (what `qwen3vl-lab export` wrote) as is.
- `HF_DIR=/path/to/Qwen3-VL-2B-Instruct` exports that checkpoint once (fp32 with attention outputs,
  and INT4) into the cache folder and uses the export.
- Otherwise the tiny random-weight checkpoint (`make_tiny(seed=0)`) is made and exported (fp32 with
  attention outputs, and INT4) on first use (~4 s) into the cache folder: `$QWEN3VL_LAB_CACHE`, else `$XDG_CACHE_HOME/qwen3vl-lab`, else
  `~/.cache/qwen3vl-lab`. Its name carries a hash of the exporter's source, so a changed exporter
  gets a fresh export instead of a stale one.
- `guide_shapes_dir()`: the original guide's export of the trained shapes model (a plain-Qwen3
  decoder without 3-D positions or DeepStack, from onnxruntime-genai's builder), cached the same way
  (notebook 07); without the [genai] extra notebook 07 doctors `shapes_int4_dir()` instead, our own
  fp32 + INT4 export of the same model.
- `default="shapes"`: instead of the random tiny checkpoint, the trained shapes model
  (`make_tiny(preset="shapes", trained=True)`, qwen3vl_lab/shapes.py), exported fp32 with attention
  outputs and cached the same way (the hash also covers the shipped weights, so a retrained model
  is exported afresh): it answers questions about `shapes.make_scene` images.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
from pathlib import Path

from ..errors import UserError
from ..export.cache import build_once, cache_dir, exporter_hash
from ..paths import export_path

TINY_SEED = 0


def _silent(_: str) -> None:
    pass


def tiny_dir() -> Path:
    """The cached tiny folder: checkpoint in `hf/`, export in `onnx/` (cpu-fp32 with attention outputs, cpu-int4)."""
    from ..export.exporter import export  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    from ..export.tiny import make_tiny  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    def build(tmp: Path) -> None:
        make_tiny(tmp / "hf", seed=TINY_SEED)
        export(tmp / "hf", tmp / "onnx", ("fp32", "int4"), with_attentions=True, progress=False, log=_silent)

    final = cache_dir() / f"tiny-seed{TINY_SEED}-{exporter_hash()}"
    if not final.is_dir():
        build_once(final, build)
        for old in final.parent.glob(f"tiny-seed{TINY_SEED}-*"):  # made by an older exporter: never used again
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def tiny_checkpoint_dir() -> Path:
    """The tiny Hugging Face checkpoint folder (config.json + model.safetensors), made on first use."""
    return tiny_dir() / "hf"


def tiny_model_dir() -> Path:
    """The tiny checkpoint exported to ONNX (cpu-fp32/ with attention outputs, cpu-int4/), made on first use."""
    return tiny_dir() / "onnx"


def _shapes_export(name: str, precisions: tuple[str, ...], progress: bool = False, log=_silent) -> Path:
    """The trained shapes model exported (`precisions`, with attention outputs) into cache/<name>-<hash>/onnx, once
    (progress: the export's progress bar; log: told once where it is being made)."""
    from ..export.exporter import export  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    from ..export.tiny import TRAINED_FILES, TRAINED_PRESET, make_tiny, trained_model_dir  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    def build(tmp: Path) -> None:
        make_tiny(tmp / "hf", preset=TRAINED_PRESET, trained=True)
        export(tmp / "hf", tmp / "onnx", precisions, with_attentions=True, progress=progress, log=_silent)

    shipped = Path(str(trained_model_dir()))  # retrained weights -> a new cache folder
    weights = [shipped / name for name in TRAINED_FILES if (shipped / name).is_file()]
    final = cache_dir() / f"{name}-{exporter_hash(*weights)}"
    if not final.is_dir():
        log(f"exporting the trained shapes model to ONNX into {final} (once; later runs reuse it)")
        build_once(final, build)
        for old in final.parent.glob(f"{name}-*"):  # made by an older exporter: never used again
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final / "onnx"


def shapes_model_dir(progress: bool = False, log=_silent) -> Path:
    """The trained shapes model exported to ONNX (cpu-fp32/ with attention outputs), made on first use (what `demo`
    and `generate` without --model_dir use too)."""
    return _shapes_export("shapes-trained", ("fp32",), progress, log)


def shapes_int4_dir() -> Path:
    """The trained shapes model exported fp32 (with attention outputs) and INT4, what `export --precision fp32 int4`
    writes, made on first use: what notebook 07 doctors when the [genai] extra is not installed."""
    return _shapes_export("shapes-int4", ("fp32", "int4"))


def has_genai() -> bool:
    """Is onnxruntime-genai (the [genai] extra, whose builder makes the guide's export) importable?"""
    return importlib.util.find_spec("onnxruntime_genai") is not None


def outliers_model_dir() -> Path:
    """The trained shapes model with activation outliers planted (`make-tiny --trained --outliers`), exported fp32 and
    INT4 (the default recipe), made on first use; its checkpoint (with outliers.json) is the folder's hf/."""
    from ..export.exporter import export  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    from ..export.outliers import plant_outliers  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    from ..export.tiny import TRAINED_FILES, TRAINED_PRESET, make_tiny, trained_model_dir  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)

    def build(tmp: Path) -> None:
        make_tiny(tmp / "shapes", preset=TRAINED_PRESET, trained=True)
        plant_outliers(tmp / "shapes", tmp / "hf")
        shutil.rmtree(tmp / "shapes")
        export(tmp / "hf", tmp / "onnx", ("fp32", "int4"), progress=False, log=_silent)

    shipped = Path(str(trained_model_dir()))
    weights = [shipped / name for name in TRAINED_FILES if (shipped / name).is_file()]
    return build_once(cache_dir() / f"shapes-outliers-{exporter_hash(*weights)}", build) / "onnx"


def guide_shapes_dir() -> Path:
    """The original guide's export of the trained shapes model (cpu-fp32/, cpu-int4/, pytorch/), made on first use.

    Built by `export.guide.make_guide_export` (onnxruntime-genai's builder: the genai extra), once, into
    the cache; the name carries the same hash as `shapes_model_dir` (exporter source and shipped weights)."""
    from ..export.guide import make_guide_export  # noqa: PLC0415 (the builder imports torch: only when asked)
    from ..export.tiny import TRAINED_FILES, TRAINED_PRESET, make_tiny, trained_model_dir  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    def build(tmp: Path) -> None:
        make_tiny(tmp / "hf", preset=TRAINED_PRESET, trained=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            make_guide_export(tmp / "hf", tmp / "guide")  # the builder prints every tensor it writes
        shutil.rmtree(tmp / "hf")  # the guide keeps its own copy in guide/pytorch/

    shipped = Path(str(trained_model_dir()))
    weights = [shipped / name for name in TRAINED_FILES if (shipped / name).is_file()]
    final = cache_dir() / f"guide-shapes-{exporter_hash(*weights)}"
    if not final.is_dir():
        build_once(final, build)
        for old in final.parent.glob("guide-shapes-*"):  # made by an older exporter: never used again
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final / "guide"


def exported_hf_dir(hf_dir: str | Path) -> Path:
    """A real checkpoint exported once (fp32 with attention outputs, and INT4) into the cache folder."""
    from ..export.exporter import export  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    hf_dir = Path(hf_dir).expanduser().resolve()
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"HF_DIR={hf_dir} has no config.json; point HF_DIR at a Qwen3-VL checkpoint folder")
    key = hashlib.sha256(f"{hf_dir}|{exporter_hash()}".encode()).hexdigest()[:12]
    return build_once(cache_dir() / f"export-{hf_dir.name}-{key}",
                       lambda tmp: export(hf_dir, tmp, ("fp32", "int4"), with_attentions=True, progress=True))


def user_model_dir() -> Path | None:
    """The folder the user asked for with MODEL_DIR or HF_DIR, or None (then the tiny checkpoint is used)."""
    if os.environ.get("MODEL_DIR"):
        return _model_dir_setting()
    if os.environ.get("HF_DIR"):
        return exported_hf_dir(os.environ["HF_DIR"])
    return None


def doctor_dir() -> Path:
    """The folder notebook 07 doctors: MODEL_DIR (an export of any kind) as is, else the guide's export of the
    trained shapes model (`guide_shapes_dir`; needs the [genai] extra), else -- without the extra -- our own fp32 +
    INT4 export of it (`shapes_int4_dir`). HF_DIR there means that folder's checkpoint (see `doctor_checkpoint`)."""
    if os.environ.get("MODEL_DIR"):
        return _model_dir_setting()
    return guide_shapes_dir() if has_genai() else shapes_int4_dir()


def _model_dir_setting() -> Path:
    """MODEL_DIR, checked as every export path is (paths.export_path): a folder, or a decoder .onnx file; a file
    of another kind is called a file, a missing path missing."""
    return export_path(Path(os.environ["MODEL_DIR"]).expanduser(), "MODEL_DIR",
                       fix="set it to an export folder (ours, the guide's, onnxruntime-genai's, onnx-community's) or a "
                           "decoder .onnx file")


def doctor_checkpoint() -> Path | None:
    """HF_DIR, the checkpoint of the folder notebook 07 doctors, when that folder ships none (else None)."""
    if not os.environ.get("HF_DIR"):
        return None
    hf_dir = Path(os.environ["HF_DIR"]).expanduser()
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"HF_DIR={hf_dir} has no config.json; point HF_DIR at the Qwen3-VL checkpoint the export was made from")
    return hf_dir


DEFAULTS = ("tiny", "shapes")


def _check_default(default: str) -> None:
    if default not in DEFAULTS:
        raise UserError(f"unknown default model {default!r}; use one of {', '.join(DEFAULTS)}")


def model_dir(default: str = "tiny") -> Path:
    """MODEL_DIR, else HF_DIR exported once, else the tiny checkpoint's (default="shapes": the trained shapes model's) export."""
    _check_default(default)
    return user_model_dir() or (shapes_model_dir() if default == "shapes" else tiny_model_dir())


def is_tiny() -> bool:
    return user_model_dir() is None


def is_shapes() -> bool:
    """True when no MODEL_DIR / HF_DIR is set, i.e. `default="shapes"` gives the trained shapes model."""
    return user_model_dir() is None


def open_model(text_precision: str = "fp32", default: str = "tiny"):
    """load_model(model_dir(default), text_precision): the three sessions, config and tokenizer."""
    from ..model import load_model  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    return load_model(model_dir(default), text_precision)


def describe(default: str = "tiny") -> str:
    """One line: which model the notebook is running on."""
    if os.environ.get("MODEL_DIR"):
        return f"MODEL_DIR: {model_dir()}"
    if os.environ.get("HF_DIR"):
        return f"HF_DIR {os.environ['HF_DIR']} exported to {model_dir()}"
    _check_default(default)
    if default == "shapes":
        return f"trained shapes model (qwen3vl_lab/shapes.py) exported to {shapes_model_dir()}"
    return f"tiny random-weight checkpoint (seed {TINY_SEED}) exported to {tiny_model_dir()}"


def require_attentions(model) -> None:
    """Stop with a clear message when the decoder was exported without attention outputs."""
    if not model.teaching_decoder.io.attentions:
        raise UserError(f"{model.folder} was exported without attention outputs; re-export it with "
                        "`qwen3vl-lab export --with_attentions` (or use HF_DIR, which does)")


def sample_image() -> str:
    """A real photograph that ships with matplotlib (Grace Hopper, 512 x 600): no download needed."""
    from matplotlib import cbook  # noqa: PLC0415 (a notebook imports the builder only when it makes a model)
    return str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
