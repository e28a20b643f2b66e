"""qwen3vl-lab: run, see and fix Qwen3-VL on ONNX Runtime, one visible step at a time.

Read in this order to follow one token from prompt to logits:
config.py -> tokenizer.py -> steps.py (embed, build_positions, prefill, decode_step) -> positions.py
-> export/decoder.py (the graph itself) -> sampling.py -> generate.py.
"""

__version__ = "0.1.0"

__all__ = ["Qwen3VLPipeline", "Qwen3VLTextOnlyPipeline", "load_model"]


def __getattr__(name):  # lazy: `import qwen3vl_lab` stays cheap (no onnxruntime/transformers import)
    if name == "Qwen3VLTextOnlyPipeline":
        from .pipeline import Qwen3VLTextOnlyPipeline  # noqa: PLC0415 (lazy: see above)

        return Qwen3VLTextOnlyPipeline
    if name == "Qwen3VLPipeline":
        from .pipeline import Qwen3VLPipeline  # noqa: PLC0415 (lazy: see above)

        return Qwen3VLPipeline
    if name == "load_model":
        from .model import load_model  # noqa: PLC0415 (lazy: see above)

        return load_model
    raise AttributeError(name)
