"""The engines `qwen3vl-lab bench --vs` compares against, each in its own process.

    python -m qwen3vl_lab.apps.bench_workers genai GENAI_DIR --threads 2
    python -m qwen3vl_lab.apps.bench_workers torch HF_DIR --threads 2

A worker loads its model once, prints `{"ready": ...}`, then answers one JSON line per request
`{"ids": [[...]], "new_tokens": M}` with `{"prefill_s": t, "decode_s": [t, ...], "peak_rss_bytes": n}`:
prefill = prompt in -> first new token out; decode_s = one entry per further token (forced length,
greedy). A separate process keeps each engine's memory and thread pool apart, so the bench can
alternate A/B runs in one command and report each side's own peak RSS.

onnxruntime-genai is the optional `bench` extra (`pip install onnxruntime-genai onnx_ir`); torch
(transformers' PyTorch model) is only imported by `--vs torch`, like the training extra.
"""

from __future__ import annotations

import json
import sys
import time


def peak_rss_bytes() -> int:
    """VmHWM of this process (Linux); 0 elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
    def __init__(self, folder: str, threads: int | None):
        import onnxruntime_genai as og  # noqa: PLC0415

        self.og = og  # threads: the bench writes intra_op_num_threads into the folder's genai_config.json
        self.model = og.Model(folder)

    def run(self, ids: list[list[int]], new_tokens: int) -> dict:
        import numpy as np  # noqa: PLC0415

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
    def __init__(self, folder: str, threads: int | None):
        import torch  # noqa: PLC0415
        from transformers import Qwen3VLForConditionalGeneration  # noqa: PLC0415

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()

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


ENGINES = {"genai": GenaiEngine, "torch": TorchEngine}


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="qwen3vl_lab.apps.bench_workers")
    p.add_argument("engine", choices=sorted(ENGINES))
    p.add_argument("folder")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    engine = ENGINES[a.engine](a.folder, a.threads)
    print(json.dumps({"ready": a.engine, "load_peak_rss_bytes": peak_rss_bytes()}), flush=True)
    reset_peak_rss()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        result = engine.run(request["ids"], request["new_tokens"])
        result["peak_rss_bytes"] = peak_rss_bytes()
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
