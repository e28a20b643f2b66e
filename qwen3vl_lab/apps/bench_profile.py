"""`qwen3vl-lab bench --profile`: where a decode step's time goes, op type by op type.

    qwen3vl-lab bench --model_dir OUT --text_precision int4 --profile [--variants] [--vs genai --hf_dir CKPT] [--spinning]

Each decoder graph (our `model-fast.onnx`, and with `--vs genai` onnxruntime-genai's `model.onnx`) runs
alone in a plain onnxruntime session with the same session options (our RuntimeOptions: threads,
spinning) and onnxruntime's profiler on, for `warmup` + `steps` decode steps of one token at the same
cache length. Both graphs get their KV buffers as onnxruntime-genai runs its own (`past_present_share_buffer`):
one preallocated buffer per layer bound as past and present (IOBinding), so both GroupQueryAttention
kernels write in place and the steps compare graph with graph, not Python loop with C++ loop.
`--variants` adds our graph built the other ways (separate projections, SiLU as Sigmoid + Mul: `fast_variants`)
to the same interleaved run: an A/B of each graph choice.

The profile's kernel events ("Node" category, `args.op_name`) of the timed steps are summed by op type and
attributed to their step: op type -> the median over steps of its ms in a step, with the number of nodes of
that type run per step; `step_ms` is the median `model_run` event, `kernel_ms` the median of the kernels'
sum per step, `other_ms` the difference (the executor, thread hand-offs). All graphs are open at once and
their steps alternate, so load on a shared machine falls on each alike (2B dims INT4: ~3.5 GB for two
graphs; in fp32, 14 GB). The profiler adds a little time per node to every graph alike.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from ..config import ModelConfig, TextConfig
from ..decoder import DecoderIO
from ..export.decoder_fast import build_fast_decoder
from ..hugepages import huge_pages
from ..layout import COS_CACHE, DECODER_FILE, FAST_DECODER_FILE, SEQLENS_K, SIN_CACHE, TOTAL_SEQUENCE_LENGTH
from ..model import RuntimeOptions
from ..rope import rope_cache


@dataclass(frozen=True)
class ProfileConfig:
    context: int = 32  # cache length before the profiled steps
    warmup: int = 3
    steps: int = 10
    batch_size: int = 1


@dataclass(frozen=True)
class OpTime:
    op: str
    ms_per_step: float
    nodes_per_step: float


@dataclass(frozen=True)
class StepProfile:
    graph: str
    step_ms: float  # median model_run of the profiled steps
    kernel_ms: float  # median over steps of the kernels' sum
    ops: tuple[OpTime, ...]  # slowest first

    @property
    def other_ms(self) -> float:
        return self.step_ms - self.kernel_ms

    def as_dict(self) -> dict:
        return {"graph": self.graph, "step_ms": self.step_ms, "kernel_ms": self.kernel_ms, "other_ms": self.other_ms,
                "ops": {o.op: {"ms_per_step": o.ms_per_step, "nodes_per_step": o.nodes_per_step} for o in self.ops}}


# -- feeding one decode step to any of the decoders -----------------------------------------------------
def decode_feeds(session: ort.InferenceSession, text: TextConfig, cfg: ProfileConfig) -> tuple[dict, dict]:
    """(inputs, outputs) arrays for a one-token decode step at cache length cfg.context: every input the graph
    declares, the KV buffers (B, kv, capacity, hd) shared between past and present."""
    io = DecoderIO.read(session)
    B, P, C = cfg.batch_size, cfg.context, cfg.context + 1  # every step writes position P again
    rng = np.random.default_rng(0)
    inputs: dict[str, np.ndarray] = {}
    if io.token_input == "input_ids":
        inputs["input_ids"] = rng.integers(0, 1000, (B, 1), dtype=np.int64)  # (B, 1)
    else:
        inputs[io.token_input] = 0.02 * rng.standard_normal((B, 1, text.hidden_size), dtype=np.float32)  # (B, 1, H)
    if io.positions != "none":
        inputs["position_ids"] = np.full((3, B, 1) if io.positions == "3d" else (B, 1), P, np.int64)
    declared = {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
    if io.attention_mask in declared:
        inputs[io.attention_mask] = np.ones((B, P + 1), np.int64)  # (B, total): the filled length, not the capacity
    cos, sin = rope_cache(text, C)
    extra = {SEQLENS_K: np.full((B,), P, np.int32), TOTAL_SEQUENCE_LENGTH: np.array(P + 1, np.int32),
             COS_CACHE: cos, SIN_CACHE: sin}
    inputs.update({k: v for k, v in extra.items() if k in declared})
    if io.deepstack:
        num = session.get_inputs()[[i.name for i in session.get_inputs()].index(io.deepstack)].shape[0]
        inputs[io.deepstack] = np.zeros((num, B, 1, text.hidden_size), np.float32)
    if io.logits_to_keep:
        inputs[io.logits_to_keep] = np.array(1, np.int64)
    outputs = {io.logits: np.zeros((B, 1, text.vocab_size), np.float32)}
    kv_shape = (B, text.num_key_value_heads, C, text.head_dim)  # (B, kv, C, hd)
    for past, present in zip(io.past, io.present):
        for p, q in zip(past, present):
            inputs[p] = outputs[q] = np.zeros(kv_shape, np.float32)  # one buffer: past and present
    return inputs, outputs


# -- profiling ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Graph:
    """A decoder to profile: the file at `path`, or `model` (serialized) whose external data lies beside `path`."""

    label: str
    path: Path
    model: bytes | None = None


def fast_variants(folder: Path, config: ModelConfig) -> list[Graph]:
    """The fast decoder of `folder` built the other ways an A/B asks about, in memory over the same weight bytes:
    separate q/k/v and gate/up projections (genai's layout), SiLU as Sigmoid + Mul (genai's form), and RoPE inside
    GroupQueryAttention instead of MRotaryEmbedding (exact for decode steps, which are text). A variant
    that would need weights of its own (a fused fp32 graph) is left out."""
    source = onnx.load(str(folder / DECODER_FILE), load_external_data=False)
    out = []
    with tempfile.TemporaryDirectory(prefix="qwen3vl-variant-") as tmp:
        for label, kwargs in (("ours, separate projections", {"fuse": False}), ("ours, Sigmoid*Mul", {"silu": "sigmoid"}),
                              ("ours, rotary in GQA", {"rotary": "gqa"})):
            model = build_fast_decoder(config, source, folder, data_dir=Path(tmp), **kwargs)
            if not any(Path(tmp).iterdir()):  # every weight is a reference into folder's files
                out.append(Graph(label, folder / FAST_DECODER_FILE, model.SerializeToString()))
    return out


def open_graph(graph: Graph, options: RuntimeOptions, profile_prefix: Path | None = None) -> ort.InferenceSession:
    """The graph's session with our session options (and onnxruntime's profiler on, given a file prefix)."""
    so = options.session_options()
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    with huge_pages(options.huge_pages):  # as load_model's sessions (hugepages.py)
        if graph.model is None:
            return ort.InferenceSession(str(graph.path), so, providers=["CPUExecutionProvider"])
        # from memory: its external data is read from the folder of `path`
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.path.parent))
        return ort.InferenceSession(graph.model, so, providers=["CPUExecutionProvider"])


class BoundStep:
    """One decode step of a session at cfg's cache length and batch, its inputs and outputs bound once."""

    def __init__(self, session: ort.InferenceSession, text: TextConfig, cfg: ProfileConfig):
        self.session = session
        inputs, outputs = decode_feeds(session, text, cfg)
        self.binding, self.alive = session.io_binding(), {}  # one OrtValue per array (a KV buffer is bound twice)
        for name, array in inputs.items():
            self.alive[id(array)] = ort.OrtValue.ortvalue_from_numpy(array)
            self.binding.bind_ortvalue_input(name, self.alive[id(array)])
        for name, array in outputs.items():
            self.alive.setdefault(id(array), ort.OrtValue.ortvalue_from_numpy(array))
            self.binding.bind_ortvalue_output(name, self.alive[id(array)])

    def run(self) -> float:
        """Seconds for one step (the same position each time: the same work)."""
        t0 = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        return time.perf_counter() - t0


def alternate(steps: list[BoundStep], warmup: int, n: int) -> list[list[float]]:
    """`warmup` untimed rounds, then n rounds of one step each, each round starting one graph later (ABC BCA
    CAB: every graph in every position equally often; with two graphs this is ABBA): per step the seconds of
    its n runs. (Reversing the order every round instead, ABC CBA, runs the end graphs twice in a row and the
    middle one never; under load such a run once put its middle graph 1.8x ahead, which reversing the order
    took away.)"""
    for _ in range(warmup):
        for b in steps:
            b.run()
    seconds: list[list[float]] = [[] for _ in steps]
    for r in range(n):
        for k in range(len(steps)):
            i = (r + k) % len(steps)
            seconds[i].append(steps[i].run())
    return seconds


def profile_graphs(graphs: list[Graph], text: TextConfig, options: RuntimeOptions,
                   cfg: ProfileConfig) -> list[StepProfile]:
    """Every graph open at once, their decode steps alternating (`alternate`), so a burst of load on a shared machine
    falls on all of them; each figure is a median over the profiled steps."""
    with tempfile.TemporaryDirectory(prefix="qwen3vl-profile-") as tmp:
        sessions = [open_graph(g, options, Path(tmp) / f"graph{i}") for i, g in enumerate(graphs)]
        alternate([BoundStep(s, text, cfg) for s in sessions], cfg.warmup, cfg.steps)
        traces = [json.loads(Path(s.end_profiling()).read_text()) for s in sessions]
        del sessions
    return [summarize(trace, cfg.steps, g.label) for trace, g in zip(traces, graphs)]


# -- how cost grows: decode step time over context x batch -------------------------------------------------------
GRID_CONTEXTS = (256, 2048, 8192)
GRID_BATCHES = (1, 4, 8)


def kv_bytes(text: TextConfig, context: int, batch: int) -> int:
    """One graph's KV buffers at that context and batch: 2 x layers x (B, kv, C, hd) float32."""
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * (context + 1) * text.head_dim * 4


def step_grid(graphs: list[Graph], text: TextConfig, options: RuntimeOptions, steps: int, budget_bytes: int,
              contexts=GRID_CONTEXTS, batches=GRID_BATCHES, log: Callable[[str], None] = print) -> list[dict]:
    """Median decode-step time of each graph at every (context, batch), steps alternating between graphs;
    a cell whose KV buffers (all graphs together) would exceed `budget_bytes` is skipped and said so."""
    sessions = [open_graph(g, options) for g in graphs]
    rows = []
    for context in contexts:
        for batch in batches:
            need = len(graphs) * kv_bytes(text, context, batch)
            row = {"context": context, "batch_size": batch, "kv_bytes": need}
            if need > budget_bytes:
                row["skipped"] = f"KV buffers {need / 1e9:.1f} GB > the {budget_bytes / 1e9:.1f} GB budget (--grid_memory)"
                log(f"  context {context:5d} batch {batch}: skipped ({row['skipped']})")
                rows.append(row)
                continue
            cfg = ProfileConfig(context=context, warmup=2, steps=steps, batch_size=batch)
            seconds = alternate([BoundStep(s, text, cfg) for s in sessions], cfg.warmup, cfg.steps)
            for g, sec in zip(graphs, seconds):
                ms = 1e3 * np.asarray(sec)
                row[g.label] = {"ms_per_step": float(np.median(ms)), "tok_s": batch * 1e3 / float(np.median(ms)),
                                "ms_spread": [float(ms.min()), float(ms.max())]}
            log(f"  context {context:5d} batch {batch}: " + "; ".join(
                f"{g.label} {row[g.label]['tok_s']:.2f} tok/s ({row[g.label]['ms_per_step']:.1f} ms/step)"
                for g in graphs))
            rows.append(row)
    del sessions
    return rows


def summarize(trace: list[dict], steps: int, graph: str) -> StepProfile:
    """op type -> median ms per step over the last `steps` model_run events of an onnxruntime profile."""
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[-steps:]
    if len(runs) < steps:
        raise ValueError(f"the profile has {len(runs)} model_run events, expected {steps}")
    starts = np.array([r["ts"] for r in runs])
    per_step: dict[str, np.ndarray] = {}  # op -> (steps,) ms
    nodes: dict[str, int] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < starts[0]:
            continue
        op, i = e.get("args", {}).get("op_name", "?"), int(np.searchsorted(starts, e["ts"], side="right")) - 1
        per_step.setdefault(op, np.zeros(steps))[i] += e["dur"] / 1e3
        nodes[op] = nodes.get(op, 0) + 1
    ops = tuple(sorted((OpTime(op, float(np.median(t)), nodes[op] / steps) for op, t in per_step.items()),
                       key=lambda o: -o.ms_per_step))
    kernels = sum(per_step.values()) if per_step else np.zeros(steps)
    return StepProfile(graph, float(np.median([r["dur"] / 1e3 for r in runs])), float(np.median(kernels)), ops)


def profile_table(profiles: list[StepProfile]) -> list[str]:
    """A Markdown table: op type, then ms per step (nodes per step) of each graph."""
    ops: list[str] = []
    for p in profiles:
        ops += [o.op for o in p.ops if o.op not in ops]
    head = "| op type | " + " | ".join(f"{p.graph} ms/step (nodes)" for p in profiles) + " |"
    lines = [head, "|---|" + "---|" * len(profiles)]
    for op in ops:
        cells = []
        for p in profiles:
            o = next((o for o in p.ops if o.op == op), None)
            cells.append(f"{o.ms_per_step:.3f} ({o.nodes_per_step:g})" if o else "—")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| kernels, total | " + " | ".join(f"{p.kernel_ms:.3f}" for p in profiles) + " |")
    lines.append("| outside kernels | " + " | ".join(f"{p.other_ms:.3f}" for p in profiles) + " |")
    lines.append("| step (model_run) | " + " | ".join(f"{p.step_ms:.3f}" for p in profiles) + " |")
    return lines


def profile(graphs: list[Graph], text: TextConfig, options: RuntimeOptions, cfg: ProfileConfig,
            log: Callable[[str], None] = print) -> list[StepProfile]:
    """Profile the graphs (steps alternating) and log the table."""
    profiles = profile_graphs(graphs, text, options, cfg)
    log(f"one decode step at cache length {cfg.context}, batch {cfg.batch_size}, {options.threads} threads, spinning "
        f"{'on' if options.allow_spinning else 'off'}: {cfg.steps} profiled steps, "
        "graphs alternating (onnxruntime's profiler): median ms per step")
    for line in profile_table(profiles):
        log(line)
    return profiles


def plot_grid(rows: list[dict], labels: list[str], path: Path) -> Path:
    """decode tok/s against context, one line per graph and batch size (log-x), saved as a PNG."""
    import matplotlib  # noqa: PLC0415 (start-up: only --grid --plot draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (see above)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-", "--", ":", "-."]
    for j, label in enumerate(labels):
        for batch in sorted({r["batch_size"] for r in rows}):
            cells = [r for r in rows if r["batch_size"] == batch and label in r]
            if cells:
                ax.plot([r["context"] for r in cells], [r[label]["tok_s"] for r in cells], styles[j % 4], marker="o",
                        label=f"{label}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (cached tokens)")
    ax.set_ylabel("decode tok/s (all rows)")
    ax.set_title("decode step cost as the context and the batch grow")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
