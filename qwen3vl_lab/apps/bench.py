"""`qwen3vl-lab bench`: how fast the fast path decodes, against the memory-bandwidth floor and other engines.

    qwen3vl-lab bench --model_dir OUT --text_precision int4 --prompt_tokens 32 --new_tokens 32 --runs 3
    qwen3vl-lab bench --model_dir OUT --text_precision fp32 --vs genai --hf_dir CKPT --json
    qwen3vl-lab bench --model_dir OUT --text_precision fp32 --vs torch --hf_dir CKPT
    qwen3vl-lab bench --model_dir OUT --text_precision int4 --profile [--variants] [--vs genai --hf_dir CKPT]
    qwen3vl-lab bench --model_dir OUT --text_precision int4 --grid [--vs genai --hf_dir CKPT] [--plot grid.png]

`--profile` and `--grid` time the decoder graphs alone, in onnxruntime, instead (`bench_profile.py`).
Our prepacked weights are on 2 MiB pages (`hugepages.py`, `--huge_pages on`, as every session of the toolkit);
`off` leaves them on 4 KiB pages; `ab` also runs a second copy of our model on 4 KiB pages, alternating with the
first (`huge_pages_ratio`). The probe's weight is always on 2 MiB pages: the floor is what the machine can do.

Decoding a token reads every decoder weight once (lm_head included), so a decode step cannot be
faster than weight bytes / memory bandwidth. The bandwidth is measured the way decode reads its
weights: onnxruntime's own fp32 MatMul, a GEMV (1 x K @ K x N) over a prepacked weight larger than
the caches (`bandwidth_buffer_bytes`: >= 256 MiB, 8x the largest CPU cache), with the decoder's
thread count and spinning setting, in a worker process (`bench_workers.py gemv`, so its memory is not
counted as ours), sampled before every engine's run, interleaved with the timed runs. The bandwidth the
floor divides by is what the machine can sustain, as STREAM reports it: the best of all those samples
(`sustained_bandwidth`). A median moves with the load of the moment (on a shared 2-core VM two
back-to-back benches read 26.8 and 16.2 GB/s and printed 63% and 123% of the floor); the best of many
runs is what the machine sustains (under heavy load even it moves: the probe's spread is printed beside it). A decode step also reads every weight, so the
machine sustained at least weight bytes / the fastest step: when that beats the probe, it is the
bandwidth (and the report says so), so the share can never exceed 100%.
`floor_ms_per_token` = weight bytes / bandwidth; `floor_fraction` = floor_ms_per_token /
ms_per_token (the median decode step), i.e. the share of the bandwidth floor achieved
(`best_run_floor_fraction`: over the fastest run's mean step).

`--vs genai` builds onnxruntime-genai's own export of the same checkpoint (its model builder, same
precision, and our export's INT4 block size, accuracy level and symmetry; both graphs' recipes are read back from
their MatMulNBits nodes and printed, `recipes_match`) and runs it twice: at its session
defaults (onnxruntime's: threads spin between ops) and with our spinning setting (`genai_matched_*`,
`matched_ratio`; ours is `--spinning`, by default decided from what other processes use now: `model.spinning_pays`). `--vs torch` loads transformers' PyTorch model (fp32). Each runs in a worker process
(`bench_workers.py`) and the runs alternate (each run starts one engine later: ABC BCA CAB; with two
engines, ABBA) in the same command, so every side sees the
same machine load. Every figure is a median over `--runs`; prefill = prompt in -> first token out;
decode = the following steps (forced length, greedy). Nothing here asserts a speed: the command
prints figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..errors import UserError
from ..export.files import check_replaceable, replace_folder, staging_folder
from ..export.quantize import Int4Recipe, read_recipe
from ..fast import FastDecoder
from ..generate import Prompt, encode_visuals, generate_step, preprocess_visuals
from ..hugepages import anon_huge_bytes
from ..layout import FAST_DECODER_FILE
from ..limits import others_busy_cores
from ..model import RuntimeOptions, load_model, spinning_pays
from ..paths import external_data
from ..sampling import greedy
from ..steps import build_positions, embed
from .bench_kernels import WIDTH, kernel_times
from .bench_profile import Graph, ProfileConfig, fast_variants, plot_grid, profile, step_grid
from .bench_workers import GEMV_K, peak_rss_bytes, reset_peak_rss

GB = 1e9
PROBE_RUNS = 5  # bandwidth probe runs before each timed run (and before the first)


@dataclass(frozen=True)
class BenchConfig:
    model_dir: str
    precision: str = "fp32"
    prompt_tokens: int = 32
    new_tokens: int = 32
    runs: int = 3
    batch_size: int = 1
    vs: str | None = None  # "genai" or "torch"
    hf_dir: str | None = None
    genai_dir: str | None = None  # default: MODEL_DIR/genai-cpu-<precision>, built when missing
    threads: int | None = None  # onnxruntime / torch intra-op threads (default: one per core)
    image_size: int = 448  # the vision-encode timing image (0 skips it)
    seed: int = 0
    spinning: bool | None = None  # our sessions' thread spinning; None: decided from others' CPU use (model.spinning_pays)
    profile: bool = False  # per-op profile of one decode step (bench_profile.py) instead of the timed runs
    variants: bool = False  # --profile also our graph's other builds (separate projections, Sigmoid*Mul, GQA rotary)
    grid: bool = False  # decode step time over context x batch (bench_profile.step_grid) instead of the timed runs
    grid_memory_gb: float = 6.0  # the grid skips cells whose KV buffers (all graphs) would exceed this
    plot: str | None = None  # --grid: write the figure (PNG) here
    huge_pages: str = "on"  # "on", "off", or "ab": ours with and without 2 MiB pages, alternating (hugepages.py)
    kernels: bool = False  # one MatMulNBits of the model's width per bits / block size, timed (bench_kernels.py)


# -- the machine ------------------------------------------------------------------------------------
def largest_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs; 0 when unknown)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


def bandwidth_buffer_bytes() -> int:
    """The bandwidth probe's weight size: 256 MiB, or 8x the largest cache when that is more."""
    return max(256 * 2**20, 8 * largest_cache_bytes())


def graph_weight_bytes(path: Path) -> int:
    """Bytes of every initializer of an ONNX graph (external data included): what one decode step reads."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:  # location, offset, length checked (one line if junk)
            total += external_data(t, path.parent, str(path))[2] or 0
        else:
            total += len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes
    return total


def graph_recipe(path: Path, vocab_size: int) -> dict:
    """What a decoder graph's MatMulNBits nodes say (read from the graph, not from a config beside it): block
    sizes, accuracy levels, bits of the body and of the lm_head (the MatMul with N = vocab_size), zero points."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    head = [a for a in attrs if a.get("N") == vocab_size]
    body = [a for a in attrs if a.get("N") != vocab_size]
    return {"block_size": sorted({a.get("block_size", 0) for a in body}),
            "accuracy_level": sorted({a.get("accuracy_level", 0) for a in body}),
            "bits": sorted({a.get("bits", 4) for a in body}),
            "lm_head": f"int{head[0].get('bits', 4)}" if head else "fp32",
            "zero_points": any(len(n.input) > 3 and n.input[3] for n in nodes)}


def recipe_text(recipe: dict) -> str:
    if not recipe["bits"]:
        return "no MatMulNBits (fp32 weights)"
    join = lambda xs: "/".join(map(str, xs))  # noqa: E731
    return (f"{join(recipe['bits'])}-bit, block {join(recipe['block_size'])}, accuracy_level "
            f"{join(recipe['accuracy_level'])}, {recipe['lm_head']} lm_head, "
            f"{'zero points' if recipe['zero_points'] else 'symmetric'}")


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Floor:
    """The bandwidth floor of a decode step: `weight_bytes` read once at the sustained bandwidth."""

    bandwidth: float  # bytes/s: the best probe sample, or the fastest decode step's when that is higher
    source: str  # "probe" or "decode step"
    probe_samples: tuple[float, ...]  # bytes/s, every probe run
    seconds: float  # weight_bytes / bandwidth: a step that only streamed the weights once
    fraction: float  # seconds / the median decode step (<= 1)
    best_run_fraction: float  # seconds / the fastest run's mean step (<= 1)


def sustained_bandwidth(weight_bytes: int, probe_bytes: int, probe_seconds: list[float],
                        step_seconds: list[float], run_mean_seconds: list[float]) -> Floor:
    """The floor from the probe's timings and the decode steps' (all in seconds).

    Sustained bandwidth = max(best probe run, weight_bytes / fastest decode step): a decode step reads every
    weight once, so it is itself a (lower) bandwidth measurement; the floor is never slower than a step
    that happened, and its share of any step is at most 100%."""
    samples = tuple(probe_bytes / t for t in probe_seconds)
    probe, decode = max(samples), weight_bytes / min(step_seconds)
    bandwidth, source = (probe, "probe") if probe >= decode else (decode, "decode step")
    floor_s = weight_bytes / bandwidth
    return Floor(bandwidth, source, samples, floor_s, floor_s / float(np.median(step_seconds)),
                 floor_s / min(run_mean_seconds))


# -- our fast path ------------------------------------------------------------------------------------
def prompt_ids(cfg: BenchConfig, vocab_limit: int = 151643) -> np.ndarray:
    """(B, S) ordinary token ids (no special tokens), the same rows for every engine."""
    rng = np.random.default_rng(cfg.seed)
    row = rng.integers(0, vocab_limit, cfg.prompt_tokens, dtype=np.int64)
    return np.repeat(row[None, :], cfg.batch_size, axis=0)


def run_ours(model, ids: np.ndarray, new_tokens: int) -> dict:
    """One forced-length greedy generation on the fast path -> prefill_s, decode_s, overhead_s."""
    t0 = time.perf_counter()
    prompt = Prompt(ids, embed(model, ids), build_positions(ids))  # (B, S), (B, S, H), (3, B, S)
    embed_s = time.perf_counter() - t0
    steps = list(generate_step(model, prompt, greedy, new_tokens, decoder=FastDecoder(model), eos_token_ids=[]))
    decode = [s.seconds for s in steps[1:]]  # decoder call + sampling + bookkeeping, per decode step
    overhead = [s.seconds - s.decoder_seconds for s in steps[1:]]  # outside the embedding row + onnxruntime run
    return {"prefill_s": embed_s + steps[0].seconds, "decode_s": decode, "overhead_s": overhead}


def vision_encode_seconds(model, size: int, seed: int) -> float | None:
    """Preprocess + vision tower for one random size x size image (None without a vision model)."""
    if not size or not model.has_vision:
        return None
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    visuals = preprocess_visuals(model, [image], image_size=size)
    encode_visuals(model, visuals.pixel_values, visuals.image_grid_thw)
    return time.perf_counter() - t0


# -- the other engine ------------------------------------------------------------------------------------
class Worker:
    """A `bench_workers` process: one JSON request per line in, one JSON result per line out."""

    def __init__(self, engine: str, folder: Path | None, threads: int | None, spinning: bool | None = None,
                 extra: tuple[str, ...] = (), name: str | None = None):
        cmd = [sys.executable, "-m", "qwen3vl_lab.apps.bench_workers", engine, *([str(folder)] if folder else [])]
        if threads:
            cmd += ["--threads", str(threads)]
        if spinning is not None:
            cmd += ["--spinning", str(int(spinning))]
        cmd += list(extra)
        self.engine = name or engine
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = [ln for ln in self.stderr.read().strip().splitlines() if ln.strip()][-1:] or ["no output"]
            raise UserError(f"the {self.engine} worker stopped ({tail[0][:300]}); check that it is installed "
                            f"(`pip install 'qwen3vl-lab[bench]'`) and that the model folder is complete")
        return json.loads(line)

    def request(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, ids: np.ndarray, new_tokens: int) -> dict:
        return self.request({"ids": ids.tolist(), "new_tokens": new_tokens})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


# what `--vs genai` imports: onnxruntime-genai, and its model builder's imports (onnx_ir, torch, transformers)
BUILDER_PACKAGES = ("onnxruntime_genai", "onnx_ir", "torch", "transformers")
MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


def missing_package(module: str) -> str:
    """The one line for a package `--vs genai` needs that is not installed."""
    return (f"--vs genai needs the Python package {module!r} (onnxruntime-genai's model builder imports it), which is "
            "not installed; pip install 'qwen3vl-lab[bench]' (torch pinned to 2.13.0, the CPU build)")


def genai_options(recipe: Int4Recipe | None) -> list[str]:
    """The builder's --extra_options for our export's INT4 recipe (block size, accuracy level, symmetry), so both
    sides quantize alike; the builder's own defaults are block 32, accuracy_level 4, symmetric (= Int4Recipe())."""
    r = recipe or Int4Recipe()
    return [f"block_size={r.block_size}", f"accuracy_level={r.accuracy_level}",
            f"is_symmetric={'true' if r.symmetric else 'false'}"]


def default_genai_dir(cfg: BenchConfig, recipe: Int4Recipe | None) -> Path:
    """MODEL_DIR/genai-cpu-PRECISION for the builder's default recipe; other recipes get their own folder
    (genai-cpu-int4-b128-acc4-sym), so a build for one recipe is never reused for another."""
    name = f"genai-cpu-{cfg.precision}"
    r = recipe or Int4Recipe()
    if cfg.precision == "int4" and (r.block_size, r.accuracy_level, r.symmetric) != (32, 4, True):
        name += f"-b{r.block_size}-acc{r.accuracy_level}-{'sym' if r.symmetric else 'asym'}"
    return Path(cfg.model_dir) / name


def genai_folder(cfg: BenchConfig, log: Callable[[str], None], recipe: Int4Recipe | None = None) -> Path:
    """onnxruntime-genai's builder export of --hf_dir (same precision, and for INT4 our export's block size,
    accuracy level and symmetry), built once; used as it is (the engine sets its threads over the
    genai_config.json, never in it). What each graph holds is read back from the graphs (`graph_recipe`)."""
    out = Path(cfg.genai_dir) if cfg.genai_dir else default_genai_dir(cfg, recipe)
    if not (out / "genai_config.json").is_file():
        for package in BUILDER_PACKAGES:  # found, not imported: torch never enters this process
            if importlib.util.find_spec(package) is None:
                raise UserError(missing_package(package))
        check_replaceable(out, name="--genai_dir")  # before minutes of building: a folder of the user's is never replaced
        out.parent.mkdir(parents=True, exist_ok=True)
        with staging_folder(out.parent, f".{out.name}-", name="--genai_dir", shown=out) as staging:
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(cfg.hf_dir), "-o", str(staging),
                   "-p", cfg.precision, "-e", "cpu", "-c", str(staging / "cache")]
            if cfg.precision == "int4":
                cmd += ["--extra_options", *genai_options(recipe)]
            log(f"building the onnxruntime-genai {cfg.precision} model of {cfg.hf_dir} (its model builder) ...")
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not (staging / "genai_config.json").is_file():
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                missing = MISSING_MODULE.search(done.stderr)
                if missing:  # an environment without a package: not the checkpoint's fault
                    raise UserError(missing_package(missing[1].split(".")[0]))
                raise UserError(f"onnxruntime-genai's builder failed on {cfg.hf_dir} ({tail[:300]}); pass --hf_dir "
                                "the Hugging Face checkpoint this export was made from")
            shutil.rmtree(staging / "cache", ignore_errors=True)
            replace_folder(staging, out, what="onnxruntime-genai builder export", name="--genai_dir")
        log(f"  built in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


# -- the whole benchmark ------------------------------------------------------------------------------------
def _decode_rate(result: dict, batch: int) -> float:
    steps = result["decode_s"]
    return batch * len(steps) / sum(steps) if steps else float("nan")


def _median(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else float("nan")


def check_config(cfg: BenchConfig) -> None:
    if cfg.precision not in ("fp32", "int4"):
        raise UserError(f"--text_precision {cfg.precision!r} is unknown; choose fp32 or int4")
    if cfg.vs not in (None, "genai", "torch"):
        raise UserError(f"--vs {cfg.vs!r} is unknown; choose genai or torch")
    if cfg.vs and not cfg.hf_dir:
        raise UserError(f"--vs {cfg.vs} needs --hf_dir, the Hugging Face checkpoint the export was made from "
                        "(the other engine loads the same weights from it)")
    if cfg.vs and not (Path(cfg.hf_dir) / "config.json").is_file():
        raise UserError(f"--hf_dir {cfg.hf_dir} has no config.json; pass the checkpoint folder the export was "
                        "made from")
    if sum((cfg.profile, cfg.grid, cfg.kernels)) > 1:
        raise UserError("--profile, --grid and --kernels are separate runs; pass one of them")
    if cfg.variants and not cfg.profile:
        raise UserError("--variants adds graphs to --profile; pass --profile too")
    if cfg.plot and not cfg.grid:
        raise UserError("--plot draws the --grid figure; pass --grid too")
    if cfg.plot and not Path(cfg.plot).resolve().parent.is_dir():
        raise UserError(f"--plot {cfg.plot}: its folder does not exist; create it or pass another path")
    if cfg.huge_pages not in ("off", "on", "ab"):
        raise UserError(f"--huge_pages {cfg.huge_pages!r} is unknown; choose off, on or ab")
    if cfg.huge_pages == "ab" and (cfg.profile or cfg.grid or cfg.kernels):
        raise UserError("--huge_pages ab is an A/B of the timed runs; pass on or off with --profile, --grid or --kernels")
    if cfg.vs == "torch" and cfg.precision != "fp32":
        raise UserError("--vs torch compares fp32 only (transformers' model is fp32 here); use --text_precision fp32")


def bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark, log a readable report, return the figures (the JSON object)."""
    check_config(cfg)
    threads = cfg.threads or default_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    busy = others_busy_cores()  # the one sample spinning auto decides from, reported beside the decision
    spinning = cfg.spinning if cfg.spinning is not None else spinning_pays(threads, busy)
    options = RuntimeOptions(threads=threads, allow_spinning=spinning, huge_pages=cfg.huge_pages != "off")
    if cfg.profile or cfg.grid:
        return profile_decode(cfg, options, log)
    if cfg.kernels:
        return kernel_table(cfg, options, log)
    probe = start_probe(options)
    try:
        return timed_runs(cfg, options, probe, {"load_average_1min": load, "others_busy_cores": busy}, log)
    finally:
        probe.close()


def start_probe(options: RuntimeOptions) -> "Worker":
    """The bandwidth probe's worker, with our threads and spinning. Start it before our model loads: its weight
    gets 2 MiB pages while the memory is still free (after a 7 GB fp32 model and the page cache of its files,
    the kernel may have none left to give, and the report would say 0 MiB)."""
    return Worker("gemv", None, options.threads, options.allow_spinning, ("--bytes", str(bandwidth_buffer_bytes())),
                  name="bandwidth probe")


def timed_runs(cfg: BenchConfig, options: RuntimeOptions, probe: "Worker", machine: dict,
               log: Callable[[str], None]) -> dict:
    """The timed runs of `bench`: ours, the other engines (worker processes) and the probe, interleaved."""
    threads, spinning = options.threads, options.allow_spinning
    model = load_model(cfg.model_dir, cfg.precision, options, open_decoder=False)
    if cfg.prompt_tokens + cfg.new_tokens > model.context_length:
        raise UserError(f"--prompt_tokens + --new_tokens = {cfg.prompt_tokens + cfg.new_tokens} exceeds the model's "
                        f"context ({model.context_length}); use fewer tokens")
    t0 = time.perf_counter()
    model.fast_decoder  # noqa: B018 (open the session: weights loaded and prepacked)
    load_s = time.perf_counter() - t0
    load_peak = peak_rss_bytes()
    huge_bytes = anon_huge_bytes()  # ours alone so far (the A/B copy opens below)
    small, small_load_s = None, None  # --huge_pages ab: a second copy on 4 KiB pages, run in turn with the first
    if cfg.huge_pages == "ab":
        small = load_model(cfg.model_dir, cfg.precision, replace(options, huge_pages=False), open_decoder=False)
        t0 = time.perf_counter()
        small.fast_decoder  # noqa: B018 (see above)
        small_load_s = time.perf_counter() - t0
    weight_bytes = graph_weight_bytes(model.folder / FAST_DECODER_FILE)
    recipe = graph_recipe(model.folder / FAST_DECODER_FILE, model.config.text.vocab_size)
    genai_recipe = None
    ids = prompt_ids(cfg)
    others: dict[str, Worker] = {}  # name -> worker, run in this order (reversed every other run)
    try:
        gemv_s = probe.request({"runs": PROBE_RUNS})["seconds"]
        if cfg.vs == "genai":
            folder = genai_folder(cfg, log, read_recipe(model.folder))
            genai_recipe = graph_recipe(folder / "model.onnx", model.config.text.vocab_size)
            others["genai"] = Worker("genai", folder, threads)  # its defaults: onnxruntime's thread spinning
            others["genai_matched"] = Worker("genai", folder, threads, spinning, name="genai (matched)")
        elif cfg.vs == "torch":
            others["torch"] = Worker("torch", Path(cfg.hf_dir), threads)
        warm = min(4, cfg.new_tokens)
        run_ours(model, ids, warm)
        if small is not None:
            run_ours(small, ids, warm)
        for w in others.values():
            w.run(ids, warm)
        ours, peaks, ours_small = [], [], []
        theirs: dict[str, list] = {name: [] for name in others}
        sides = ["ours", *(["ours_4k"] if small is not None else []), *others]
        for r in range(cfg.runs):  # each run starts one engine later: every engine in every position alike
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # (two engines: ABBA)
                gemv_s += probe.request({"runs": PROBE_RUNS})["seconds"]  # interleaved with every timed run
                if side == "ours":
                    reset_peak_rss()
                    ours.append(run_ours(model, ids, cfg.new_tokens))
                    peaks.append(peak_rss_bytes())
                elif side == "ours_4k":
                    ours_small.append(run_ours(small, ids, cfg.new_tokens))
                else:
                    theirs[side].append(others[side].run(ids, cfg.new_tokens))
        run_peak = max(peaks)
        probe_bytes = probe.ready["bytes"]
        probe_huge = probe.ready.get("huge_bytes", 0)
    finally:
        for w in others.values():
            w.close()
    vision_s = vision_encode_seconds(model, cfg.image_size, cfg.seed)

    B, S = ids.shape
    decode = _median(_decode_rate(o, B) for o in ours)
    steps = [x for o in ours for x in o["decode_s"]]
    step_s = _median(steps)  # the median decode step
    floor = sustained_bandwidth(weight_bytes, probe_bytes, gemv_s, steps,
                                [sum(o["decode_s"]) / len(o["decode_s"]) for o in ours])
    samples = np.asarray(floor.probe_samples) / GB
    result = {
        "precision": cfg.precision, "batch_size": B, "prompt_tokens": S, "new_tokens": cfg.new_tokens,
        "runs": cfg.runs, "threads": threads, "spinning": spinning,
        "spinning_choice": "auto" if cfg.spinning is None else "set", **machine,
        "recipe": recipe,
        "decode_tok_s": decode,
        "decode_tok_s_runs": [_decode_rate(o, B) for o in ours],
        "prefill_tok_s": _median(B * S / o["prefill_s"] for o in ours),
        "prefill_s": _median(o["prefill_s"] for o in ours),
        "overhead_ms_per_token": 1e3 * _median(x for o in ours for x in o["overhead_s"]),
        "ms_per_token": 1e3 * step_s,
        "weight_bytes": weight_bytes,
        "bandwidth_gb_s": floor.bandwidth / GB,
        "bandwidth_source": floor.source,
        "bandwidth_gb_s_samples": samples.tolist(),
        "bandwidth_probe_spread_gb_s": [float(samples.min()), float(np.median(samples)), float(samples.max())],
        "bandwidth_probe": f"onnxruntime fp32 MatMul 1x{GEMV_K} @ {GEMV_K}x{probe_bytes // (4 * GEMV_K)} "
                           f"({probe_bytes / 2**20:.0f} MiB, {probe_huge / 2**20:.0f} MiB of it on 2 MiB pages), {threads} threads, "
                           f"spinning {'on' if spinning else 'off'}",
        "bandwidth_probe_huge_bytes": probe_huge,
        "floor_ms_per_token": 1e3 * floor.seconds,
        "floor_tok_s": B / floor.seconds,
        "floor_fraction": floor.fraction,
        "best_run_floor_fraction": floor.best_run_fraction,
        "load_s": load_s,
        "huge_pages": cfg.huge_pages,
        "huge_page_bytes": huge_bytes,
        "load_peak_rss_bytes": load_peak,
        "peak_rss_bytes": run_peak,
        "rss_over_weights": run_peak / weight_bytes,
        "vision_encode_s": vision_s,
        "vision_image_size": cfg.image_size if vision_s is not None else None,
    }
    if ours_small:
        result["ours_4k_decode_tok_s"] = _median(_decode_rate(o, B) for o in ours_small)
        result["ours_4k_decode_tok_s_runs"] = [_decode_rate(o, B) for o in ours_small]
        result["ours_4k_prefill_tok_s"] = _median(B * S / o["prefill_s"] for o in ours_small)
        result["huge_pages_ratio"] = decode / result["ours_4k_decode_tok_s"]
        result["ours_4k_load_s"] = small_load_s
    for name, runs in theirs.items():
        result[f"{name}_decode_tok_s"] = _median(_decode_rate(t, B) for t in runs)
        result[f"{name}_decode_tok_s_runs"] = [_decode_rate(t, B) for t in runs]
        result[f"{name}_prefill_tok_s"] = _median(B * S / t["prefill_s"] for t in runs if t["prefill_s"] > 0)
        result[f"{name}_peak_rss_bytes"] = max(t["peak_rss_bytes"] for t in runs) if runs else None
        result[f"{name}_load_peak_rss_bytes"] = others[name].ready.get("load_peak_rss_bytes")
    if cfg.vs:
        result["ratio"] = decode / result[f"{cfg.vs}_decode_tok_s"]
        result["prefill_ratio"] = result["prefill_tok_s"] / result[f"{cfg.vs}_prefill_tok_s"]
    if cfg.vs == "genai":
        result["genai_recipe"] = genai_recipe
        result["recipes_match"] = genai_recipe == recipe
        result["genai_spinning"] = "onnxruntime's default (on)"
        result["genai_matched_spinning"] = "on" if spinning else "off"
        result["matched_ratio"] = decode / result["genai_matched_decode_tok_s"]
        result["matched_prefill_ratio"] = result["prefill_tok_s"] / result["genai_matched_prefill_tok_s"]
    log_report(result, cfg, log)
    return result


def kernel_table(cfg: BenchConfig, options: RuntimeOptions, log: Callable[[str], None]) -> dict:
    """`--kernels`: one MatMulNBits node of the model's width per bits / block size, and the bandwidth probe."""
    probe = start_probe(options)
    try:
        k = load_model(cfg.model_dir, cfg.precision, options, open_decoder=False).config.text.hidden_size
        probe_s = probe.request({"runs": 20})["seconds"]
        probe_bytes = probe.ready["bytes"]
    finally:
        probe.close()
    times = kernel_times(k, options, rounds=20 * cfg.runs)
    log(f"one MatMulNBits (1 x {k} @ {k} x {WIDTH * k}, accuracy_level 4, random weights), {options.threads} threads, "
        f"spinning {'on' if options.allow_spinning else 'off'}: median of {20 * cfg.runs} calls each, calls rotating")
    log("| bits, block | ms per call | GB/s of packed weights | G weights/s |")
    log("|---|---|---|---|")
    for t in times:
        d = t.as_dict()
        log(f"| {t.bits}, {t.block} | {d['ms']:.2f} | {d['gb_s']:.1f} | {d['gweights_s']:.0f} |")
    total = sum(t.weight_bytes for t in times)  # the calls rotate: each streams its weights when all of them, together,
    if total < 8 * largest_cache_bytes():  # are far larger than the caches
        log(f"(these weights, {total / 2**20:.1f} MiB in all, are not 8x larger than the largest CPU cache: the "
            "figures time calls from the caches, not the kernel streaming from memory)")
    best = probe_bytes / min(probe_s) / GB
    log(f"bandwidth probe (fp32 MatMul, {probe_bytes / 2**20:.0f} MiB): best {best:.1f} GB/s, median "
        f"{probe_bytes / float(np.median(probe_s)) / GB:.1f} GB/s of 20 runs; a kernel below it is computing, not "
        "waiting for memory")
    return {"k": k, "n": WIDTH * k, "threads": options.threads, "spinning": options.allow_spinning,
            "kernels": [t.as_dict() for t in times], "probe_best_gb_s": best}


def profile_decode(cfg: BenchConfig, options: RuntimeOptions, log: Callable[[str], None]) -> dict:
    """`--profile`: op type -> ms per decode step of our fast graph (and genai's with --vs genai), same options;
    `--grid`: the median step time of each over context x batch."""
    if cfg.vs == "torch":
        raise UserError("--profile and --grid compare onnxruntime graphs (ours, genai's); drop --vs torch")
    model = load_model(cfg.model_dir, cfg.precision, options, open_decoder=False)
    graphs = [Graph("ours", model.fast_decoder_file())]
    if cfg.variants:
        graphs += fast_variants(model.folder, model.config)
    if cfg.vs == "genai":
        graphs.append(Graph("genai", genai_folder(cfg, log, read_recipe(model.folder)) / "model.onnx"))
    if cfg.grid:
        log(f"decode step time over context x batch, {options.threads} threads, spinning "
            f"{'on' if options.allow_spinning else 'off'}: median of {5 * cfg.runs} steps per cell, graphs alternating")
        rows = step_grid(graphs, model.config.text, options, 5 * cfg.runs, int(cfg.grid_memory_gb * GB), log=log)
        if cfg.plot:
            log(f"wrote {plot_grid(rows, [g.label for g in graphs], Path(cfg.plot))}")
        return {"precision": cfg.precision, "threads": options.threads, "spinning": options.allow_spinning,
                "grid": rows}
    pcfg = ProfileConfig(context=cfg.prompt_tokens, steps=10 * cfg.runs, batch_size=cfg.batch_size)
    profiles = profile(graphs, model.config.text, options, pcfg, log)
    return {"precision": cfg.precision, "context": pcfg.context, "batch_size": pcfg.batch_size, "steps": pcfg.steps,
            "threads": options.threads, "spinning": options.allow_spinning,
            "profile": {p.graph: p.as_dict() for p in profiles}}


def spin_reason(r: dict) -> str:
    if r["spinning_choice"] != "auto":
        return " (as asked)"
    busy = "unknown" if r["others_busy_cores"] is None else f"{r['others_busy_cores']:.2f}"
    return (f" (auto: other processes kept {busy} of {default_threads()} cores busy just before loading; "
            "--spinning on/off to force)")


def log_report(r: dict, cfg: BenchConfig, log: Callable[[str], None]) -> None:
    gb = lambda n: f"{n / GB:.2f} GB" if n else "n/a"  # noqa: E731
    log(f"qwen3vl-lab bench: {cfg.model_dir} {r['precision']}, batch {r['batch_size']}, {r['prompt_tokens']} prompt "
        f"+ {r['new_tokens']} new tokens, {r['runs']} runs, {r['threads']} threads, spinning "
        f"{'on' if r['spinning'] else 'off'}{spin_reason(r)}")
    log(f"  prefill     {r['prefill_tok_s']:10.1f} tok/s   ({r['prefill_s'] * 1e3:.1f} ms to the first token)")
    log(f"  decode      {r['decode_tok_s']:10.2f} tok/s   ({r['ms_per_token']:.2f} ms per step, runs "
        + ", ".join(f"{x:.2f}" for x in r["decode_tok_s_runs"]) + ")")
    log(f"  overhead    {r['overhead_ms_per_token']:10.3f} ms/token outside onnxruntime (sampling, bookkeeping)")
    low, mid, high = r["bandwidth_probe_spread_gb_s"]
    source = ("best" if r["bandwidth_source"] == "probe" else
              "below what the fastest decode step read, which is used instead; best")
    log(f"  bandwidth   {r['bandwidth_gb_s']:.1f} GB/s sustained ({source} of {len(r['bandwidth_gb_s_samples'])} "
        f"runs of {r['bandwidth_probe']}; spread {low:.1f} / {mid:.1f} / {high:.1f} GB/s min / median / max)")
    log(f"  floor       {gb(r['weight_bytes'])} read per decode step / {r['bandwidth_gb_s']:.1f} GB/s = "
        f"{r['floor_ms_per_token']:.2f} ms per step; measured {r['ms_per_token']:.2f} ms -> "
        f"{100 * r['floor_fraction']:.0f}% of the floor (fastest run {100 * r['best_run_floor_fraction']:.0f}%)")
    log(f"  memory      peak RSS {gb(r['peak_rss_bytes'])} while generating ({r['rss_over_weights']:.2f}x the "
        f"weights), {gb(r['load_peak_rss_bytes'])} at load ({r['load_s']:.1f} s)")
    if r["vision_encode_s"] is not None:
        log(f"  vision      {r['vision_encode_s']:.3f} s per {r['vision_image_size']}x{r['vision_image_size']} image "
            "(preprocess + vision tower)")
    log(f"  weights     {recipe_text(r['recipe'])}")
    if r["huge_pages"] != "off":
        log(f"  huge pages  {gb(r['huge_page_bytes'])} of our memory on 2 MiB pages (--huge_pages {r['huge_pages']}; "
            "off to leave them on 4 KiB pages)")
    if "huge_pages_ratio" in r:
        log(f"  vs ours on 4 KiB pages (a second copy, runs alternating): decode {r['ours_4k_decode_tok_s']:.2f} tok/s "
            "(runs " + ", ".join(f"{x:.2f}" for x in r["ours_4k_decode_tok_s_runs"])
            + f") -> huge/4 KiB {r['huge_pages_ratio']:.3f}x; prefill {r['ours_4k_prefill_tok_s']:.1f} tok/s; its "
            f"decoder opened in {r['ours_4k_load_s']:.1f} s (ours, moving to 2 MiB pages: {r['load_s']:.1f} s)")
    if "ratio" not in r:
        return
    sides = [(cfg.vs, cfg.vs, "ratio", "prefill_ratio")]
    if cfg.vs == "genai":
        same = "the same as ours" if r["recipes_match"] else "DIFFERENT from ours: a speed/accuracy trade, not like for like"
        log(f"  genai's     {recipe_text(r['genai_recipe'])} ({same})")
        sides = [("genai", f"genai ({r['genai_spinning']} spinning)", "ratio", "prefill_ratio"),
                 ("genai_matched", f"genai (spinning {r['genai_matched_spinning']}, as ours)", "matched_ratio",
                  "matched_prefill_ratio")]
    for key, label, ratio, prefill_ratio in sides:
        log(f"  vs {label}: decode {r[f'{key}_decode_tok_s']:.2f} tok/s (runs "
            + ", ".join(f"{x:.2f}" for x in r[f"{key}_decode_tok_s_runs"])
            + f") -> ours/{cfg.vs} {r[ratio]:.2f}x; prefill "
            f"{r[f'{key}_prefill_tok_s']:.1f} tok/s -> {r[prefill_ratio]:.2f}x; its peak RSS "
            f"{gb(r[f'{key}_peak_rss_bytes'])}")
