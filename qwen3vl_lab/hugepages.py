"""2 MiB pages under a session's weights (Linux transparent huge pages), after onnxruntime has prepacked them.

    with huge_pages(options.huge_pages) as collapsed:   # model.py opens every session inside this
        session = ort.InferenceSession(...)
    collapsed[0]                                        # bytes now backed by 2 MiB pages (0 when off / not Linux)

A decode step streams every weight once. With 4 KiB pages, 1 GB of weights spans 262,144 pages: the
TLB misses on nearly every page and the hardware prefetchers stop at each page boundary. onnxruntime
prepacks its weights into memory it gets from malloc, which the kernel backs with 4 KiB pages unless
the memory is advised (transparent_hugepage "madvise", the usual setting). After a session has opened,
the anonymous mappings that appeared while it opened are advised (MADV_HUGEPAGE) and rebuilt as huge
pages at once (MADV_COLLAPSE, Linux 6.1+). Nothing else in the process is touched (numpy already advises
its own large arrays, the fast path's KV buffers among them; `load_model` leaves the embedding table, which
is gathered a few rows a step, on 4 KiB pages). Where the kernel refuses (older kernels, THP "never", no
free 2 MiB blocks) the memory stays as it was and the count says so. It costs time at load (copying the
weights once: +1-3 s for the 1.1 GB of a 2B INT4 decoder on the 2-core VM) for 8-15% per decode step,
which `bench --huge_pages ab` measures.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from contextlib import contextmanager
from typing import Iterator

from .limits import proc_kib

HUGE = 2 * 2**20  # x86-64 / arm64 (4 KiB base pages) PMD size
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <linux/mman.h>


def anonymous_regions() -> set[tuple[int, int]]:
    """(start, end) of this process's private anonymous read-write mappings (malloc's large blocks among them)."""
    if not sys.platform.startswith("linux"):
        return set()
    regions = set()
    try:
        with open("/proc/self/maps", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if len(fields) == 5 and fields[1].startswith("rw"):  # no path: anonymous
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    regions.add((start, end))
    except OSError:
        return set()
    return regions


def anon_huge_bytes() -> int:
    """Bytes of this process's anonymous memory backed by huge pages now (AnonHugePages; 0 when unknown)."""
    return proc_kib("/proc/self/smaps_rollup", "AnonHugePages:")


@functools.cache
def _madvise():
    """libc's madvise (the process's own symbols: no library search), or None where there is none."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def collapse(regions: set[tuple[int, int]]) -> int:
    """Advise and collapse the whole 2 MiB spans of these regions into huge pages; the bytes that succeeded."""
    spans = [(lo, hi) for lo, hi in ((-(-start // HUGE) * HUGE, end // HUGE * HUGE) for start, end in sorted(regions))
             if hi - lo >= HUGE]  # the aligned spans inside the regions
    madvise = _madvise() if spans else None
    if madvise is None:
        return 0
    return sum(hi - lo for lo, hi in spans
               if madvise(lo, hi - lo, MADV_HUGEPAGE) == 0 and madvise(lo, hi - lo, MADV_COLLAPSE) == 0)


@contextmanager
def huge_pages(enabled: bool) -> Iterator[list[int]]:
    """Collapse into huge pages the anonymous memory that appears inside the block (e.g. a session's prepacked
    weights); yields a one-item list that holds the bytes collapsed afterwards."""
    collapsed = [0]
    before = anonymous_regions() if enabled else set()
    yield collapsed
    if enabled:
        collapsed[0] = collapse(new_ranges(before, anonymous_regions()))


def new_ranges(before: set[tuple[int, int]], after: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The address ranges mapped in `after` but not in `before` (the kernel merges a new mapping into a neighbour
    with the same flags, so a region of `after` can hold old memory: only its new parts are returned)."""
    out = set()
    old = sorted(before)
    for start, end in sorted(after):
        at = start
        for lo, hi in old:
            if hi <= at or lo >= end:
                continue
            if lo > at:
                out.add((at, lo))
            at = max(at, hi)
        if at < end:
            out.add((at, end))
    return out
