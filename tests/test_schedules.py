"""Per-iteration schedules, checked against the DINO reference's ``cosine_scheduler`` written out here.

Caron et al. 2021 (arXiv 2104.14294), reference code ``utils.cosine_scheduler``: a linear warm-up,
then ``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` over the remaining ``n`` iterations.
"""

from __future__ import annotations

import numpy as np
import pytest

from sslbench.base.schedules import cosine_schedule, linear_warmup_then_constant


def reference_cosine(base, final, epochs, ipe, warmup_epochs=0, start_warmup_value=0.0):
    """The DINO reference ``cosine_scheduler`` (warm-up with ``np.linspace``, end point included)."""
    warmup = np.array([])
    warmup_iters = warmup_epochs * ipe
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(epochs * ipe - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def test_cosine_length_warmup_and_end():
    base, final, start, epochs, ipe, warm = 1.0, 0.01, 0.1, 10, 5, 2
    s = cosine_schedule(base, final, epochs, ipe, warmup_epochs=warm, start_warmup_value=start)
    warmup_iters = warm * ipe
    assert s.shape == (epochs * ipe,)
    assert s[0] == pytest.approx(start)
    steps = np.diff(s[:warmup_iters])
    assert np.all(steps > 0)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-12)  # linear
    # The ramp ends on base (np.linspace with its end point), then the cosine starts from base.
    assert s[warmup_iters - 1] == pytest.approx(base)
    assert s[warmup_iters] == pytest.approx(base)
    assert s[-1] == pytest.approx(final, abs=0.01 * (base - final))
    assert s[-1] > final
    assert np.all(np.diff(s[warmup_iters:]) < 0)  # the cosine only decreases
    assert s.min() >= min(start, final) and s.max() <= base


def test_cosine_increasing_schedule_is_monotone():
    # The EMA momentum schedule goes up: 0.996 -> 1.
    s = cosine_schedule(0.996, 1.0, 4, 25)
    assert s[0] == pytest.approx(0.996)
    assert np.all(np.diff(s) > 0)
    assert s[-1] < 1.0 and s[-1] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("epochs", "ipe"), [(10, 7), (3, 1), (1, 50)])
def test_cosine_without_warmup_matches_dino_reference(epochs, ipe):
    ours = cosine_schedule(5e-4, 1e-6, epochs, ipe)
    np.testing.assert_allclose(ours, reference_cosine(5e-4, 1e-6, epochs, ipe), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("epochs", "ipe", "warm"), [(10, 7, 2), (5, 4, 1), (3, 10, 3)])
def test_cosine_with_warmup_matches_dino_reference(epochs, ipe, warm):
    ours = cosine_schedule(0.3, 0.001, epochs, ipe, warmup_epochs=warm, start_warmup_value=0.05)
    ref = reference_cosine(0.3, 0.001, epochs, ipe, warmup_epochs=warm, start_warmup_value=0.05)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-15)  # warm-up included


def test_cosine_fractional_and_overlong_warmup():
    s = cosine_schedule(1.0, 0.0, 2, 10, warmup_epochs=0.5)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], np.linspace(0.0, 1.0, 5))
    assert s[5] == pytest.approx(1.0)
    # A warm-up longer than training follows its own ramp, cut at the end of training.
    s = cosine_schedule(1.0, 0.0, 1, 4, warmup_epochs=5)
    np.testing.assert_allclose(s, np.linspace(0.0, 1.0, 20)[:4], atol=1e-15)


def test_linear_warmup_then_constant():
    s = linear_warmup_then_constant(0.04, 0.07, warmup_epochs=2, epochs=5, iterations_per_epoch=3)
    assert s.shape == (15,)
    np.testing.assert_allclose(s[:6], np.linspace(0.04, 0.07, 6), atol=1e-15)
    assert s[0] == pytest.approx(0.04)
    assert s[5] == pytest.approx(0.07)
    np.testing.assert_array_equal(s[6:], np.full(9, 0.07))
    assert np.all(np.diff(s) >= 0)


def test_linear_warmup_then_constant_edges():
    np.testing.assert_array_equal(linear_warmup_then_constant(0.04, 0.07, 0, 3, 2), np.full(6, 0.07))
    s = linear_warmup_then_constant(0.04, 0.07, 10, 2, 3)  # longer warm-up than training: cut
    np.testing.assert_allclose(s, np.linspace(0.04, 0.07, 30)[:6], atol=1e-15)
