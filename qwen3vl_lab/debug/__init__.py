"""Fix it: find out why a quantized (INT4) model talks gibberish, with functions notebooks call.

    from qwen3vl_lab.debug import diagnose, teacher_forced, compare_layers, compare_weights, run_checklist
    from qwen3vl_lab.debug.compare import compare      # all prompts (module and function share the name)
    from qwen3vl_lab.debug.sweep import sweep
    report = diagnose("OUT", "int4")                  # everything, printed by report.render()

Modules (each usable on its own; results are small dataclasses holding numpy arrays):
    inputs.py     models (Model or folder) and prompts (text, text + image, prepared Prompt)
    record.py     the reference's side, recorded once (greedy tokens + logits per step), so models run one at a time
    compare.py    teacher-forced fp32-vs-test metrics per step; free greedy divergence
    layers.py     named intermediate tensors of both decoders, SQNR / relative error per layer
    weights.py    MatMulNBits unpacking (checked against onnxruntime) and per-matrix / per-block error
    checklist.py  the INT4-gibberish checklist, pass/fail with evidence
    sweep.py      build INT4 recipe variants and rank them by agreement with fp32
    simulate.py   SIMULATED low-bit weights (3 bits, per-tensor scales, clipping): what MatMulNBits cannot run
    variants.py   quantization variants of an fp32 export, built once and cached by content
    results.py    finished sweep rows cached on disk by (export, recipe, prompt set): sweeps resume
    cluster.py    where a sweep's jobs run: here, in local processes (--workers) or as Ray tasks (--ray)
    breakage.py   deliberately broken folders (no q/k-norm, DeepStack unwired, 1-D positions, ...)
    doctor.py     all of the above for one folder (qwen3vl_lab.viz.doctor draws them: write_figures)
"""

from __future__ import annotations

_EXPORTS = {
    "PromptSpec": "inputs", "DEFAULT_PROMPTS": "inputs", "as_model": "inputs", "prepare": "inputs",
    "RecordedPrompt": "record", "record_reference": "record", "record_prompt": "record",
    "Comparison": "compare", "TeacherForced": "compare", "FreeRun": "compare", "compare_recorded": "compare",
    "teacher_forced": "compare", "free_greedy": "compare", "kl_divergence": "compare",
    "LayerReport": "layers", "compare_layers": "layers", "capture": "layers", "activation_stats": "layers",
    "accuracy_level_decoder": "layers", "sqnr_db": "layers",
    "QuantizedMatrix": "weights", "WeightReport": "weights", "read_quantized": "weights", "dequantize": "weights",
    "dequantize_with_onnxruntime": "weights", "compare_weights": "weights",
    "Checklist": "checklist", "CheckItem": "checklist", "run_checklist": "checklist",
    "SweepResult": "sweep", "default_recipes": "sweep", "Backend": "cluster", "ResultCache": "results",
    "SimRecipe": "simulate", "fake_quantize": "simulate", "simulate_folder": "simulate",
    "contrast_recipes": "variants", "parse_recipe": "variants", "build_variant": "variants",
    "make_broken": "breakage",
    "DoctorReport": "doctor", "diagnose": "doctor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):  # lazy, like the package root: importing qwen3vl_lab.debug stays cheap
    if name in _EXPORTS:
        from importlib import import_module  # noqa: PLC0415 (lazy package: see above)

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
