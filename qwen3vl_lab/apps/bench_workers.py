"""The engines `qwen3vl-lab bench --vs` compares against, each in its own process.

    python -m qwen3vl_lab.apps.bench_workers genai GENAI_DIR --threads 2 [--spinning 0]
    python -m qwen3vl_lab.apps.bench_workers torch HF_DIR --threads 2
    python -m qwen3vl_lab.apps.bench_workers gemv --threads 2 --spinning 0 --bytes 268435456

A worker loads its model once, prints `{"ready": ...}`, then answers one JSON line per request
`{"ids": [[...]], "new_tokens": M}` with `{"prefill_s": t, "decode_s": [t, ...], "peak_rss_bytes": n}`:
prefill = prompt in -> first new token out; decode_s = one entry per further token (forced length,
greedy). A separate process keeps each engine's memory and thread pool apart, so the bench can
alternate A/B runs in one command and report each side's own peak RSS.

`gemv` is the bench's memory-bandwidth probe: an onnxruntime fp32 MatMul (1 x K @ K x N) over a
weight larger than the caches, with the session options our decoder uses; it answers `{"runs": n}`
with `{"seconds": [t, ...], "bytes": weight bytes}`.

onnxruntime-genai is the optional `bench` extra (`pip install 'qwen3vl-lab[bench]'`: onnxruntime-genai, onnx_ir
and torch==2.13.0, which its model builder imports); torch (transformers' PyTorch model) is only imported by the
`--vs torch` worker, like the training extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..limits import proc_kib


def peak_rss_bytes() -> int:
    """VmHWM of this process (Linux); 0 elsewhere."""
    return proc_kib("/proc/self/status", "VmHWM:")


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current RSS (Linux: `echo 5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- onnxruntime-genai ---------------------------------------------------------------------------
class GenaiEngine:
    """onnxruntime-genai on its builder's export. spinning None keeps its session defaults (onnxruntime's:
    threads spin between ops); True / False sets `session.intra_op.allow_spinning` on its decoder session."""

    def __init__(self, folder: str, threads: int | None, spinning: bool | None = None):
        import onnxruntime_genai as og  # noqa: PLC0415 (the optional [bench] extra, in its own worker process)

        self.og = og
        config = og.Config(folder)
        options = {} if threads is None else {"intra_op_num_threads": threads}  # over the folder's genai_config.json,
        if spinning is not None:  # which is never edited; genai passes unknown keys to onnxruntime as config entries
            options["session.intra_op.allow_spinning"] = "1" if spinning else "0"
        if options:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)

    def run(self, ids: list[list[int]], new_tokens: int) -> dict:
        og = self.og
        tokens = np.asarray(ids, np.int32)  # (B, S)
        params = og.GeneratorParams(self.model)
        total = tokens.shape[1] + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=tokens.shape[0])
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(tokens)  # the prefill
        gen.generate_next_token()  # picks the first new token from the prefill's logits
        prefill = time.perf_counter() - t0
        decode = []
        while not gen.is_done():
            t0 = time.perf_counter()
            gen.generate_next_token()  # one decoder step + the pick
            decode.append(time.perf_counter() - t0)
        return {"prefill_s": prefill, "decode_s": decode}


# -- transformers' PyTorch model ------------------------------------------------------------------------
class TorchEngine:
    def __init__(self, folder: str, threads: int | None, spinning: bool | None = None):
        import torch  # noqa: PLC0415 (the reference engine's worker process only)
        from transformers import Qwen3VLForConditionalGeneration  # noqa: PLC0415 (its worker only)

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=False, use_safetensors=True).eval()

    def run(self, ids: list[list[int]], new_tokens: int) -> dict:
        torch = self.torch
        stamps: list[float] = []

        class Clock:  # a streamer: generate() calls put() with the prompt, then once per new token
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        self.model.model.rope_deltas = None
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(torch.tensor(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, streamer=Clock() if len(ids) == 1 else None,
                                pad_token_id=151643)
        end = time.perf_counter()
        if len(stamps) < 2:  # batches cannot stream: split the time evenly (prefill unknown)
            return {"prefill_s": 0.0, "decode_s": [(end - t0) / new_tokens] * new_tokens}
        tokens = stamps[1:]  # stamps[0] is the prompt
        return {"prefill_s": tokens[0] - t0, "decode_s": [b - a for a, b in zip(tokens, tokens[1:])]}


# -- the bandwidth probe ------------------------------------------------------------------------------
GEMV_K = 4096  # rows of the probe's weight (the input width); its columns make up the size


class GemvEngine:
    """y (1, N) = x (1, K) @ W (K, N) in onnxruntime, fp32, W an initializer (prepacked like the decoder's
    MatMul weights) of `nbytes` (>= the caches), with the decoder's session options (RuntimeOptions)."""

    def __init__(self, folder: str | None, threads: int | None, spinning: bool | None = None,
                 nbytes: int = 256 * 2**20, huge: bool = True):
        # onnx / onnxruntime only in the gemv worker: the torch and genai workers' peak RSS stays their engine's
        import onnxruntime as ort  # noqa: PLC0415 (see above)

        from ..hugepages import huge_pages  # noqa: PLC0415 (see above)
        from ..model import RuntimeOptions  # noqa: PLC0415 (see above)
        k, n = GEMV_K, max(1, nbytes // (4 * GEMV_K))
        options = RuntimeOptions(threads=threads, allow_spinning=bool(spinning)).session_options()
        with tempfile.TemporaryDirectory(prefix="qwen3vl-gemv-", dir=folder) as tmp:
            path = Path(tmp) / "gemv.onnx"
            _write_gemv(path, k, n)
            with huge_pages(huge) as collapsed:  # 2 MiB pages (Linux): the bandwidth the machine can sustain
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.huge_bytes = collapsed[0]
        self.bytes = 4 * k * n
        self.x = np.random.default_rng(0).standard_normal((1, k), dtype=np.float32)
        self.run(2)  # warm: first runs allocate

    def run(self, runs: int) -> dict:
        seconds = []
        for _ in range(runs):
            t0 = time.perf_counter()
            self.session.run(None, {"x": self.x})
            seconds.append(time.perf_counter() - t0)
        return {"seconds": seconds, "bytes": self.bytes}


def _write_gemv(path, k: int, n: int) -> None:
    """The probe's graph, its (k, n) float32 weight in an external-data file beside it (written in slices)."""
    import onnx  # noqa: PLC0415 (the gemv worker only: see GemvEngine)
    from onnx import TensorProto, helper  # noqa: PLC0415 (see above)
    rng = np.random.default_rng(1)
    with open(path.with_suffix(".data"), "wb") as f:  # 16 slices: never the whole weight twice in memory
        f.writelines(rng.standard_normal((len(rows), n), dtype=np.float32).tobytes()
                     for rows in np.array_split(np.arange(k), 16))
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[k, n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", path.with_suffix(".data").name), ("offset", "0"), ("length", str(4 * k * n))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, str(path))


ENGINES = {"genai": GenaiEngine, "torch": TorchEngine, "gemv": GemvEngine}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen3vl_lab.apps.bench_workers")
    p.add_argument("engine", choices=sorted(ENGINES))
    p.add_argument("folder", nargs="?", default=None, help="the model folder (gemv: where its temp files go)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--spinning", type=int, choices=[0, 1], default=None, help="onnxruntime thread spinning")
    p.add_argument("--bytes", type=int, default=None, help="gemv: the weight's size")
    p.add_argument("--huge_pages", type=int, choices=[0, 1], default=1, help="gemv: its weight on 2 MiB pages")
    a = p.parse_args(argv)
    spinning = None if a.spinning is None else bool(a.spinning)
    extra = {"nbytes": a.bytes, "huge": bool(a.huge_pages)} if a.engine == "gemv" and a.bytes else {}
    engine = ENGINES[a.engine](a.folder, a.threads, spinning, **extra)
    ready = {"ready": a.engine, "load_peak_rss_bytes": peak_rss_bytes()}
    if a.engine == "gemv":
        ready["bytes"], ready["huge_bytes"] = engine.bytes, engine.huge_bytes
    print(json.dumps(ready), flush=True)
    reset_peak_rss()
    for line in sys.stdin:
        if not line.strip():
            continue
        result = engine.run(**json.loads(line))  # {"ids", "new_tokens"}, or {"runs"} for gemv
        result["peak_rss_bytes"] = peak_rss_bytes()
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
