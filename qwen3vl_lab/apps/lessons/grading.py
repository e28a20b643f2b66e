"""What every `check_...(student_fn)` shares: run the student's function on cases, say where it first differs
from the reference, with a hint, as the ARENA exercises do.

    graded("dequantize_block", student_fn, cases)   # True when every case matches; prints one line either way

A case that differs raises `Mismatch` (an AssertionError: the notebook stops at the exercise, pytest
reports it) whose message names the case, what the student's function returned, what the reference
returns, and a hint. A function still raising NotImplementedError (the exercise cell as shipped) is
reported as "not written yet" and returns False, so a notebook runs top to bottom before anyone
writes a line.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


class Mismatch(AssertionError):
    """A student's function differs from the reference: where, and a hint."""


def mismatch(where: str, got, want, hint: str) -> Mismatch:
    return Mismatch(f"{where}: your function gives {_short(got)}, the reference {_short(want)}\nhint: {hint}")


def _short(x) -> str:
    a = np.asarray(x)
    if a.ndim == 0:
        return f"{a.item():.6g}" if np.issubdtype(a.dtype, np.floating) else repr(a.item())
    text = np.array2string(a.reshape(-1)[:8], precision=4, separator=", ")
    return f"{text[:-1]}, ...] (shape {a.shape})" if a.size > 8 else f"{text} (shape {a.shape})"


def first_difference(got, want, atol: float = 0.0) -> int | None:
    """Index (flat) of the first element where got and want differ by more than atol; None when they agree."""
    g, w = np.asarray(got, np.float64).reshape(-1), np.asarray(want, np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isclose(g, w, rtol=0.0, atol=atol))
    return int(bad[0]) if bad.size else None


def graded(name: str, student_fn: Callable, cases: Callable[[Callable], None]) -> bool:
    """Run `cases(student_fn)`; print one line; True when it passed, False when not written yet."""
    try:
        cases(student_fn)
    except NotImplementedError:
        print(f"{name}: not written yet -- replace `raise NotImplementedError` with your code and run the cell again")
        return False
    print(f"{name}: correct, every case matches the reference")
    return True


__all__ = ["Mismatch", "first_difference", "graded", "mismatch"]
