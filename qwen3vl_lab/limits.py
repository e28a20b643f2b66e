"""The machine's bounds, in one place: cores for --threads, memory for images and the vision tower.

Refusing up front, with the number that fits, beats a hang (100000 threads exhaust the process ids)
or the OOM killer (an image whose vision attention needs 34 GB).

Memory model of one vision call (`vision.encode_image` runs one image, or one frame pair, per call):
the tower's full attention materialises scores and probabilities of shape (heads, N, N) float32 for
N = (H/16) * (W/16) patches; measured on the tiny model (2 heads), peak memory grows by 1.5 such
buffers at N = 9216, so 2 buffers are counted. Preprocessing holds the resized image (uint8), its
float32 copy and the patch rows (float32, two temporal copies): about 40 bytes per pixel.
"""

from __future__ import annotations

import math
import operator
import os
import time

from .errors import UserError

PREPROCESS_BYTES_PER_PIXEL = 40  # uint8 RGB + float32 CHW + (N, 1536) float32 patch rows
ATTENTION_BUFFERS = 2  # scores and probabilities, (heads, N, N) float32 each
MEMORY_SHARE = 0.9  # of the available memory, the rest for everything else the process holds
PATCH = 16  # pixels per patch side (Qwen3-VL)
FACTOR = 32  # image sides are multiples of patch * merge
MAX_COMPARED_STEPS = 1024  # greedy steps a comparison records: (steps, vocab) float32 logits per prompt, 0.6 GB at 4B
MAX_HELDOUT = 100_000  # shapes scenes an evaluation may ask for: ~1.5 M questions, days on a CPU (+-0.1 % by then)


# -- cores -------------------------------------------------------------------------------------
def max_threads() -> int:
    """The cores this process may run on (its CPU affinity), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def proc_kib(path: str, key: str) -> int:
    """A "Key:  N kB" field of a /proc file (e.g. /proc/self/status VmHWM:) in bytes; 0 when absent or unreadable
    (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


BUSY_SAMPLE_S = 0.25  # how long `others_busy_cores` watches the CPUs
BUSY_CACHE_S = 30.0  # a sample is reused this long (a test suite opens hundreds of sessions)
_busy_sample: tuple[float, float] | None = None  # (monotonic time, cores busy)


def _cpu_ticks(cpus: set[int]) -> int | None:
    """Busy clock ticks (all but idle and iowait) of these CPUs since boot, from /proc/stat; None if unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus and len(fields) >= 5:
            ticks = [int(x) for x in fields[:8]]
            busy += sum(ticks) - ticks[3] - ticks[4]  # user nice system [idle iowait] irq softirq steal
    return busy


def _own_ticks() -> int | None:
    """This process's user + system clock ticks (all its threads), from /proc/self/stat; None if unreadable."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def others_busy_cores(window: float = BUSY_SAMPLE_S) -> float | None:
    """Cores of this process's CPU set that other processes kept busy, watched for `window` seconds now (Linux;
    None elsewhere). Unlike the load average, which lags a minute and counts this process's own start-up
    (exporting or loading weights), this is what the other processes take now. Reused for BUSY_CACHE_S."""
    global _busy_sample
    now = time.monotonic()
    if _busy_sample is not None and now - _busy_sample[0] < BUSY_CACHE_S:
        return _busy_sample[1]
    try:
        cpus = os.sched_getaffinity(0)
        hz = os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, ValueError):
        return None
    start, own = _cpu_ticks(cpus), _own_ticks()
    t0 = time.monotonic()
    time.sleep(window)
    end, own_end = _cpu_ticks(cpus), _own_ticks()
    if None in (start, own, end, own_end):
        return None
    busy = max(0.0, ((end - start) - (own_end - own)) / hz / (time.monotonic() - t0))
    _busy_sample = (time.monotonic(), busy)
    return busy


def check_threads(threads, name: str = "threads") -> int | None:
    """None (onnxruntime's default) or an int in [1, cores]; more threads than cores only slow onnxruntime
    down, and a huge number hangs the machine creating them."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"{name} must be an integer >= 1 (or None for one per core), got {threads!r}")
    cores = max_threads()
    if threads > cores:
        raise UserError(f"{name} {threads} is more than this machine's {cores} cores; pass {cores} or fewer")
    return threads


def check_compared_steps(n_steps, name: str = "n_steps") -> int:
    """Steps a comparison records per prompt: a whole number in [1, MAX_COMPARED_STEPS] (each step keeps a row of
    logits per prompt: an unbounded count fills the memory before the first figure)."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or not 1 <= n_steps <= MAX_COMPARED_STEPS:
        shown = repr(n_steps) if len(repr(n_steps)) <= 30 else repr(n_steps)[:27] + "..."
        raise UserError(f"{name} = {shown}; pass a whole number of steps from 1 to {MAX_COMPARED_STEPS} (16 is plenty "
                        "to see a recipe diverge)")
    return n_steps


# -- memory ------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes this process can still get: the machine's (MemAvailable) or, when lower, what its own address-space
    limit leaves (RLIMIT_AS, `ulimit -v`); None if neither is known."""
    known = [n for n in (machine_memory(), address_space_left()) if n is not None]
    return min(known) if known else None


def address_space_used() -> int | None:
    """Bytes of address space this process maps now (what RLIMIT_AS counts); None where unknown."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def address_space_left() -> int | None:
    """RLIMIT_AS (`ulimit -v`) minus the address space this process already maps; None without a limit."""
    try:
        import resource  # noqa: PLC0415 (POSIX only)
    except ImportError:
        return None
    soft, used = resource.getrlimit(resource.RLIMIT_AS)[0], address_space_used()
    if soft == resource.RLIM_INFINITY or used is None:
        return None
    return max(soft - used, 0)


def memory_limit_text(available: int) -> str:
    """'4.0 GB are available' or, when the process limit is what binds, says so (a ulimit, not the machine)."""
    room = address_space_left()
    if room is not None and room <= available:
        return f"{_gb(available)} are left under this process's address-space limit (ulimit -v)"
    return f"{_gb(available)} are available"


def machine_memory() -> int | None:
    """Bytes the kernel can give this process now (MemAvailable), or free physical pages; None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def vision_call_bytes(height: int, width: int, num_heads: int, patch: int = PATCH) -> int:
    """Peak bytes of preprocessing plus one vision call on an image of height x width pixels."""
    n = (height // patch) * (width // patch)
    return PREPROCESS_BYTES_PER_PIXEL * height * width + ATTENTION_BUFFERS * num_heads * n * n * 4


def largest_side(num_heads: int, budget: int, patch: int = PATCH) -> int:
    """The largest N (a multiple of 32) whose N x N image fits `budget` bytes; 0 when even 32 does not."""
    n_max = math.isqrt(max(budget, 0) // (ATTENTION_BUFFERS * num_heads * 4 + 1))  # patches, attention only
    side = (math.isqrt(n_max) * patch) // FACTOR * FACTOR + FACTOR
    while side > 0 and vision_call_bytes(side, side, num_heads, patch) > budget:
        side -= FACTOR
    return side


def _gb(n: int) -> str:
    if n >= 2**40:
        return f"{n / 2**40:,.0f} TB"
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def check_image_memory(height: int, width: int, num_heads: int, patch: int = PATCH,
                       what: str = "an image resized to") -> None:
    """Refuse an image (or video frame) whose vision call needs more memory than the machine has now,
    naming the --image_size that fits."""
    need = vision_call_bytes(height, width, num_heads, patch)
    available = available_memory()
    if available is None:
        return
    budget = int(available * MEMORY_SHARE)
    if need <= budget:
        return
    side = largest_side(num_heads, budget, patch)
    fix = f"pass --image_size {side} or smaller (or resize the image)" if side else "free some memory"
    raise UserError(f"{what} {height}x{width} pixels needs about {_gb(need)} of memory in the vision tower "
                    f"but {memory_limit_text(available)}; {fix}")


def check_image_size(image_size, num_heads: int, patch: int = PATCH, name: str = "--image_size") -> None:
    """A fixed resize (an int N or (height, width)), checked before any image is read."""
    if image_size is None:
        return
    try:
        hw = [operator.index(v) for v in (image_size if isinstance(image_size, (tuple, list)) else (image_size,) * 2)]
    except TypeError:
        return  # the image preprocessor names the bad value
    if len(hw) != 2 or min(hw) <= 0:
        return
    check_image_memory(hw[0], hw[1], num_heads, patch, what=f"{name} {image_size}: an image resized to")


def check_pixels(height: int, width: int, frames: int = 1, what: str = "an image") -> None:
    """Preprocessing alone (before the model is known): refuse a size whose pixels cannot fit in memory."""
    need = PREPROCESS_BYTES_PER_PIXEL * height * width * frames
    available = available_memory()
    if available is None or need <= available * MEMORY_SHARE:
        return
    side = math.isqrt(int(available * MEMORY_SHARE) // (PREPROCESS_BYTES_PER_PIXEL * frames)) // FACTOR * FACTOR
    raise UserError(f"{what} resized to {height}x{width} pixels needs about {_gb(need)} of memory to preprocess "
                    f"but {memory_limit_text(available)}; pass --image_size {side} or smaller")
