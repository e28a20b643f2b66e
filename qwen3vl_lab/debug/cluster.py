"""Where the jobs of a sweep run: here one after another (the default), in N local processes, or on Ray.

    backend = Backend()                          # in this process, one job after another
    backend = Backend(workers=4)                 # a pool of 4 local processes (`--workers 4`)
    backend = Backend(ray=True)                  # Ray: RAY_ADDRESS's cluster, or a local one (`--ray`)
    backend = Backend(ray=True, address="head:6379")            # (`--ray head:6379`)
    run_jobs(fn, jobs, backend, on_result, memory=[bytes per job])   # on_result(i, record) as each finishes

A job is one module-level function call on a small picklable argument that returns a small JSON
record (a variant's metrics; never weights). With Ray each job is a task declaring `task_cpus` CPUs
and its `memory` in bytes (from the decoder's size, `variants.variant_memory`), so Ray does not
put more large decoders on a node than fit; tasks are not retried (a crash is reported as a failed
row). A job that raises is the job's problem: the caller's function catches and returns an error
record. Ctrl-C (or an exception in `on_result`) cancels the jobs still pending or running, and the
interruption is re-raised once they have stopped. A job in a worker process runs inside
`signals.deferred_interrupt()`: Ray's cancel (it simulates SIGINT in the task) and a terminal's Ctrl-C
only set a flag, and the job stops at its next `interruption_point()` (between the matrices of a build,
before a variant is moved into place), where its temporary folder is removed and nothing is half-done.
A KeyboardInterrupt landing at any bytecode could leave a half-imported module or stop onnxruntime
mid-call in a worker that Ray then reuses for the next job (and, once, a build folder behind).
Ray is an optional extra (`pip install "qwen3vl-lab[ray]"`), imported only here and only when a
Backend asks for it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import UserError
from ..signals import deferred_interrupt, interruption_point

CANCEL_WAIT_SECONDS = 60.0  # how long cancelled tasks get to clean up before the interruption goes on
LOCAL_ADDRESSES = (None, "", "auto", "local")


@dataclass(frozen=True)
class Backend:
    workers: int = 1  # local processes; 1 = in this process, one job after another
    ray: bool = False
    address: str | None = None  # a Ray cluster: "HOST:PORT", "ray://HOST:10001" or "auto"; None = RAY_ADDRESS or a new local one
    task_cpus: int = 1  # CPUs each Ray task declares (and onnxruntime threads it uses)

    def validate(self) -> "Backend":
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.task_cpus < 1:
            raise UserError(f"--task_cpus must be at least 1, got {self.task_cpus}")
        if self.ray and self.workers > 1:
            raise UserError("--ray and --workers both choose where jobs run; pass one of them")
        return self

    @property
    def local(self) -> bool:
        """Jobs run in this process, one after another."""
        return not self.ray and self.workers == 1

    @property
    def threads(self) -> int | None:
        """onnxruntime intra-op threads per job: the default here, the declared CPUs on Ray, a share of the
        cores in a pool."""
        if self.ray:
            return self.task_cpus
        if self.workers > 1:
            return max(1, (os.cpu_count() or 1) // self.workers)
        return None

    def describe(self) -> str:
        if self.ray:
            return f"Ray ({self.address or 'local or RAY_ADDRESS'}), {self.task_cpus} CPU(s) per task"
        return f"{self.workers} local processes" if self.workers > 1 else "this process"


OnResult = Callable[[int, dict], None]


def run_jobs(fn: Callable[[object], dict], jobs: Sequence, backend: Backend, on_result: OnResult, *,
             memory: Sequence[int] | None = None, names: Sequence[str] | None = None) -> None:
    """Run fn(job) for every job where `backend` says; on_result(index, record) in this process as each ends."""
    backend = backend.validate()
    if not jobs:
        return
    if backend.ray:
        _run_ray(fn, jobs, backend, on_result, memory, names)
    elif backend.workers > 1:
        _run_pool(fn, jobs, backend.workers, on_result)
    else:
        for i, job in enumerate(jobs):
            on_result(i, fn(job))


def run_deferring_interrupts(fn: Callable[[object], dict], job) -> dict:
    """fn(job) in a worker process, with Ctrl-C / a cancel deferred to the job's interruption points."""
    with deferred_interrupt():
        record = fn(job)
        interruption_point()  # cancelled after its last point: the record is not wanted
    return record


def error_record(e: BaseException) -> dict:
    """A failed job's record: the first line of the error."""
    text = str(e).strip().splitlines()
    return {"error": f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__}


# -- local processes -----------------------------------------------------------------------------
def _run_pool(fn, jobs, workers: int, on_result: OnResult) -> None:
    ctx = multiprocessing.get_context("spawn")  # onnxruntime's threads do not survive fork
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx)
    futures = {pool.submit(run_deferring_interrupts, fn, job): i for i, job in enumerate(jobs)}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    record = fut.result()
                except Exception as e:  # the worker process died (killed, out of memory)
                    record = error_record(e)
                on_result(futures[fut], record)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # queued jobs never start; running ones end or are interrupted
        raise
    pool.shutdown(wait=True)


# -- Ray -----------------------------------------------------------------------------------------
def import_ray():
    """The ray module, or a one-line UserError naming the extra to install."""
    try:
        import ray  # noqa: PLC0415 (an optional extra, imported only when a sweep asks for Ray)
    except ImportError:
        raise UserError("--ray needs Ray, which is not installed; pip install \"qwen3vl-lab[ray]\" "
                        "(or \"ray[default]\"), or run without --ray") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A quick TCP connect to a Ray address, so an unreachable one is one line now, not a long hang in ray.init."""
    hp = _host_port(address)
    if hp is None:
        raise UserError(f"--ray {address!r} is not an address; pass HOST:PORT (the head's GCS port, e.g. "
                        "10.0.0.5:6379), ray://HOST:10001, or --ray alone for a local cluster")
    try:
        socket.create_connection(hp, timeout=timeout).close()
    except OSError as e:
        raise UserError(f"the Ray cluster at {address} is unreachable ({e.strerror or type(e).__name__}); start it "
                        "with `ray start --head` on that machine or check the address and firewall") from None


def connect_ray(address: str | None = None):
    """The ray module, connected: to `address`, else to RAY_ADDRESS, else to a new local cluster (no dashboard).

    An already initialised Ray (e.g. `ray.init(num_cpus=2)` in a notebook) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    target = address if address not in LOCAL_ADDRESSES else os.environ.get("RAY_ADDRESS") or None
    if target not in LOCAL_ADDRESSES:
        check_reachable(target)
    try:
        if target in LOCAL_ADDRESSES:
            ray.init(address=target, include_dashboard=False, logging_level=logging.ERROR)
        else:
            ray.init(address=target, logging_level=logging.ERROR)
    except Exception as e:  # ray raises ConnectionError, RuntimeError, ... with long messages
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not connect to Ray at {target or 'a new local cluster'} ({first}); check "
                        "`ray status` there, or run without --ray") from None
    return ray


def _largest_node_memory(ray) -> int | None:
    sizes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    return int(max(sizes)) if sizes else None


def _run_ray(fn, jobs, backend: Backend, on_result: OnResult, memory, names) -> None:
    ray = connect_ray(backend.address)
    largest = _largest_node_memory(ray)
    if memory and largest and max(memory) > largest:
        i = max(range(len(memory)), key=lambda k: memory[k])
        what = names[i] if names else f"job {i}"
        raise UserError(f"{what} needs about {memory[i] / 2**30:.1f} GiB but the largest Ray node offers "
                        f"{largest / 2**30:.1f} GiB; add a larger node or leave out that recipe")
    remote = ray.remote(run_deferring_interrupts)
    refs = {}
    for i, job in enumerate(jobs):
        opts = {"num_cpus": backend.task_cpus, "max_retries": 0}
        if memory:
            opts["memory"] = int(memory[i])
        opts["name"] = str(names[i]) if names else getattr(fn, "__name__", "job")
        refs[remote.options(**opts).remote(fn, job)] = i
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as e:  # the task's process died (out of memory, node lost, ...)
                    record = error_record(e)
                on_result(refs[ref], record)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)  # not forced: a running task stops at its next interruption point and cleans up
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=CANCEL_WAIT_SECONDS)
        raise


__all__ = ["Backend", "check_reachable", "connect_ray", "error_record", "import_ray", "run_jobs"]
