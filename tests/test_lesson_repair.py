"""Notebook 08's exercise check: it accepts the reference solution and catches wrong ones, with a hint."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_lab.apps.lessons import repair as lesson


def test_the_reference_equalisation_passes_and_is_exact():
    assert lesson.check_equalise(lesson.equalise)
    g, weights, hidden = lesson._case()
    s = lesson.outlier_scale(g, hidden)
    assert s[5] >= 128 and (s[np.arange(64) != 5] == 1).all()  # only the planted channel is scaled, by a power of two
    new_g, new_w = lesson.equalise(g, weights, s)
    x, nx = lesson.rms_norm(hidden, g).astype(np.float32), lesson.rms_norm(hidden, new_g).astype(np.float32)
    assert np.array_equal(x[:, 5] / s[5], nx[:, 5])  # powers of two: bit-exact in float32


@pytest.mark.parametrize("wrong,hint", [
    (lambda g, ws, s: (g / s, [w / s[:, None] for w in ws]), "must come back in row k"),  # divides twice
    (lambda g, ws, s: (g, ws), "divide the norm weight"),  # changes nothing
    (lambda g, ws, s: (g / s, [w * s[:, None] for w in ws[:2]]), "scale the rows"),  # forgets one MatMul
])
def test_wrong_equalisations_are_caught_with_a_hint(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        lesson.check_equalise(wrong)


def test_an_unwritten_exercise_is_reported_not_failed(capsys):
    def todo(g, ws, s):
        raise NotImplementedError

    assert lesson.check_equalise(todo) is False and "not written yet" in capsys.readouterr().out
