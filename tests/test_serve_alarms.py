"""Shift alarms: the false-alarm probability stays <= delta on ID streams; broken variants are caught; the
detection delay on streams that shift part-way is measured.

Ville's inequality bounds P(ever M_t >= 1/delta) by delta when the p-values are independent and
uniform. Checked by replaying many seeded streams through the production code (``PowerJumper``,
``online_p_values``, ``ShiftMonitor``):

* uniform p-values, and *real* held-out ID scores of the tiny digits model (the calibration set and the
  stream re-drawn at random from images neither fitted nor calibrated on, then online conformal
  p-values) — the alarm frequency must stay below a binomial upper limit for the rate delta;
* deliberately broken variants must be caught above delta (their binomial lower limit exceeds it): a
  martingale restarted whenever it falls below 1 with the maximum over restarts taken without
  correction (CUSUM-like), an alarm on any raw p-value <= delta, and the martingale fed p-values
  against the *fixed* calibration set (which share the calibration set and are not independent);
* streams that switch to far-OOD (Fashion-MNIST) or near-OOD (digits 5-9) images part-way: the delay
  from the switch to the alarm is measured and printed (``pytest -s``), see docs/serve.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom
from test_serve_fixtures import ID_CLASSES, build_model, load_model

from oodscope.serve.martingale import (
    OnlineConformal,
    PowerJumper,
    ShiftMonitor,
    content_theta,
    first_alarm,
    online_p_values,
)

CONFIDENCE = 1e-4  # the chance that a correct implementation fails a frequency check


def upper_limit(replays: int, delta: float) -> int:
    """Most alarms a test with false-alarm probability <= delta gives in ``replays`` replays (but w.p. 1e-4)."""
    return int(binom.isf(CONFIDENCE, replays, delta))


def caught_above(alarms: int, replays: int, delta: float) -> bool:
    """The alarm count is too high for a rate <= delta (one-sided binomial test at level 1e-4)."""
    return binom.sf(alarms - 1, replays, delta) < CONFIDENCE


# --------------------------------------------------------------------------- the martingale itself
def test_power_bets_are_fair_and_the_martingale_starts_at_one():
    from scipy.integrate import quad

    kappas = np.array([0.05, 0.2, 0.5, 1.0])
    for k in kappas:  # E f(U) = int_0^1 k u^(k-1) du = 1
        assert quad(lambda u, k=k: k * u ** (k - 1), 0.0, 1.0)[0] == pytest.approx(1.0, abs=1e-6)
    # Discrete conformal p-values j/(n+1): E f(p) <= 1 (the right Riemann sum of a decreasing f).
    n = 99
    p = np.arange(1, n + 2) / (n + 1)
    assert all(np.mean(k * p ** (k - 1)) <= 1.0 + 1e-12 for k in kappas)
    bet = PowerJumper(3)
    assert np.allclose(bet.log_value, 0.0)
    out = bet.update([0.5, 0.01, 1.0])
    assert out[1] > 0 > out[2]


def test_online_p_values_are_uniform_and_independent_of_the_stream_length():
    rng = np.random.default_rng(1)
    cal, stream = rng.normal(size=50), rng.normal(size=4000)
    p = online_p_values(cal, stream, rng.random(stream.size))
    assert p.min() > 0 and p.max() <= 1
    late = p[2000:]
    # Kolmogorov-Smirnov against U(0, 1) on the late part of the stream (no drift towards small p).
    grid = np.sort(late)
    ks = np.max(np.abs(np.arange(1, grid.size + 1) / grid.size - grid))
    assert ks < 1.63 / math.sqrt(grid.size) * 1.5  # well inside the 1 % critical value
    ref = OnlineConformal([0.0, 1.0, 2.0])
    assert ref.p_value(3.0, 0.5) == pytest.approx(0.5 / 4) and ref.p_value(-1.0, 0.5) == pytest.approx(3.5 / 4)
    assert ref.p_value(1.0, 0.0) == pytest.approx(1 / 4) and ref.p_value(1.0, 1.0) == pytest.approx(3 / 4)


def test_uniform_streams_false_alarm_at_most_delta_and_broken_variants_are_caught(capsys):
    replays, steps = 4000, 1000
    rng = np.random.default_rng(20240512)
    p = rng.random((replays, steps))
    log_m = PowerJumper(replays).run(p)
    lines = []
    for delta in (0.05, 0.01):
        alarms = int((first_alarm(log_m, delta) >= 0).sum())
        lines.append(f"uniform p, {replays} x {steps}: delta {delta:g}: false alarms {alarms} "
                     f"({alarms / replays:.4f}); allowed <= {upper_limit(replays, delta)}")
        assert alarms <= upper_limit(replays, delta)
    delta = 0.05
    # Broken 1: restart the bet whenever it falls below 1 and alarm on the maximum over restarts (CUSUM).
    k, s, hit = 0.5, np.zeros(replays), np.zeros(replays, dtype=bool)
    for t in range(steps):
        s = np.maximum(s, 0.0) + math.log(k) + (k - 1.0) * np.log(p[:, t])
        hit |= s >= math.log(1.0 / delta)
    assert caught_above(int(hit.sum()), replays, delta)
    # Broken 2: alarm as soon as one p-value is <= delta.
    raw = int((p <= delta).any(axis=1).sum())
    assert caught_above(raw, replays, delta)
    # Broken 3: p-values against a fixed calibration set of 50 (not online) at delta = 0.01.
    n_cal, delta_small = 50, 0.01
    cal = np.sort(rng.random((1000, n_cal)), axis=1)
    ge = n_cal - np.stack([np.searchsorted(cal[r], p[r, :2000], side="left") for r in range(1000)])
    fixed = first_alarm(PowerJumper(1000).run((1.0 + ge) / (n_cal + 1.0)), delta_small)
    assert caught_above(int((fixed >= 0).sum()), 1000, delta_small)
    lines.append(f"broken at delta {delta:g}: restart-and-max {hit.mean():.3f}, raw p <= delta {raw / replays:.3f}; "
                 f"at delta {delta_small:g}: fixed calibration of {n_cal} {(fixed >= 0).mean():.3f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# --------------------------------------------------------------------------- real held-out ID scores
@pytest.fixture(scope="module")
def real_scores(tmp_path_factory):
    """Detector scores of the tiny digits model: held-out ID digits (never fitted or calibrated on),
    near-OOD digits 5-9, far-OOD Fashion-MNIST images."""
    from oodscope.io import ArrayDataset, digits, fashion_mnist_ood

    model = load_model(build_model(tmp_path_factory.mktemp("alarm-model") / "m"))
    src = digits()
    held_out = np.concatenate([np.flatnonzero(src.labels == c)[40:] for c in ID_CLASSES])  # fit used [:40]
    near = np.flatnonzero(~np.isin(src.labels, ID_CLASSES))
    far = fashion_mnist_ood("test", per_class=40)
    scores = {"id": model.score(ArrayDataset(src.images[held_out]), progress=False),
              "near": model.score(ArrayDataset(src.images[near]), progress=False),
              "far": np.concatenate([model.score(far.id, progress=False), model.score(far.near_ood, progress=False)])}
    assert all(np.isfinite(v).all() for v in scores.values())
    return scores


def replay(pool: np.ndarray, n_cal: int, steps: int, replays: int, seed: int, *, online: bool = True,
           after: np.ndarray | None = None, change: int | None = None, mix: float = 1.0) -> np.ndarray:
    """p-values (replays, steps) of streams re-drawn from ``pool``: calibration = n_cal scores, the stream
    = others (drawn without replacement); after step ``change`` a fraction ``mix`` comes from ``after``."""
    rng = np.random.default_rng(seed)
    out = np.empty((replays, steps))
    for r in range(replays):
        order = rng.permutation(pool.size)
        cal, stream = pool[order[:n_cal]], pool[order[n_cal:n_cal + steps]].copy()
        if after is not None:
            swap = np.flatnonzero(rng.random(steps - change) < mix) + change
            stream[swap] = after[rng.integers(0, after.size, swap.size)] + rng.normal(0, 1e-12, swap.size)
        if online:
            out[r] = online_p_values(cal, stream, rng.random(steps))
        else:
            out[r] = (1.0 + (cal[None, :] >= stream[:, None]).sum(axis=1)) / (n_cal + 1.0)
    return out


def test_real_id_streams_false_alarm_at_most_delta(real_scores, capsys):
    pool = real_scores["id"]
    replays, steps, n_cal = 1000, pool.size - 100, 100
    p = replay(pool, n_cal, steps, replays, seed=7)
    log_m = PowerJumper(replays).run(p)
    lines = []
    for delta in (0.1, 0.05):
        alarms = int((first_alarm(log_m, delta) >= 0).sum())
        lines.append(f"real held-out ID ({pool.size} digits), {replays} replays of {steps}: delta {delta:g}: false "
                     f"alarms {alarms} ({alarms / replays:.4f}); allowed <= {upper_limit(replays, delta)}")
        assert alarms <= upper_limit(replays, delta)
    # Broken 3: the same martingale on p-values against the fixed calibration set (dependent p-values:
    # they share the calibration set, and an unlucky one looks like a shift however small delta is).
    small = 30
    fixed = PowerJumper(replays).run(replay(pool, small, steps, replays, seed=7, online=False))
    delta = 0.01
    wrong = int((first_alarm(fixed, delta) >= 0).sum())
    online = PowerJumper(replays).run(replay(pool, small, steps, replays, seed=7))
    fair = int((first_alarm(online, delta) >= 0).sum())
    assert fair <= upper_limit(replays, delta)
    lines.append(f"{small} calibration scores, delta {delta:g}: online p-values {fair} alarms ({fair / replays:.3f}), "
                 f"fixed-calibration p-values {wrong} ({wrong / replays:.3f}); allowed <= "
                 f"{upper_limit(replays, delta)}")
    assert caught_above(wrong, replays, delta)
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_detection_delay_after_a_shift(real_scores, capsys):
    pool, change, steps, replays, delta = real_scores["id"], 200, 600, 100, 0.01
    rows = []
    for name, mix in (("far", 1.0), ("far", 0.3), ("near", 1.0), ("near", 0.5)):
        p = replay(pool, 100, steps, replays, seed=11, after=real_scores[name], change=change, mix=mix)
        first = first_alarm(PowerJumper(replays).run(p), delta)
        early = int(((first >= 0) & (first < change)).sum())
        delays = first[first >= change] - change
        rows.append((name, mix, early, delays.size, np.median(delays) if delays.size else math.inf,
                     np.percentile(delays, 90) if delays.size else math.inf))
        assert early <= upper_limit(replays, delta)
        if name == "far" and mix == 1.0:
            assert delays.size == replays and np.median(delays) <= 10
    with capsys.disabled():
        print(f"\ndetection delay, delta {delta:g}: change at image {change} of {steps}, {replays} replays "
              "(tiny digits model; far = Fashion-MNIST, near = digits 5-9)")
        for name, mix, early, found, median, p90 in rows:
            print(f"  {name:4s} OOD fraction {mix:.0%}: alarms before the change {early}, detected {found}/{replays}, "
                  f"delay median {median:.0f}, 90th percentile {p90:.0f} images")


# --------------------------------------------------------------------------- the service's monitor
def test_shift_monitor_is_the_vectorised_test_image_by_image():
    rng = np.random.default_rng(3)
    cal, stream = rng.normal(size=80), np.concatenate([rng.normal(size=150), rng.normal(3.0, 1.0, size=50)])
    digests = [int(i).to_bytes(16, "little") for i in range(stream.size)]
    monitor = ShiftMonitor(cal, delta=0.01)
    obs = [monitor.observe(float(s), d) for s, d in zip(stream, digests, strict=True)]
    thetas = [content_theta(d) for d in digests]
    expected_p = online_p_values(cal, stream, thetas)
    np.testing.assert_allclose([o.p_value for o in obs], expected_p, rtol=0, atol=1e-15)
    expected_log_m = PowerJumper(1).run(expected_p[None, :])[0]
    np.testing.assert_allclose([o.log_martingale for o in obs], expected_log_m, rtol=1e-12)
    raised = [i for i, o in enumerate(obs) if o.raised]
    assert len(raised) == 1 and raised[0] == first_alarm(expected_log_m[None, :], 0.01)[0] and raised[0] >= 150
    assert monitor.alarm and monitor.n_observed == stream.size
    # A repeat of a recent image is no evidence: skipped, nothing changes.
    before = monitor.log_martingale
    again = monitor.observe(float(stream[-1]), digests[-1])
    assert again.p_value is None and monitor.log_martingale == before and monitor.n_observed == stream.size


def test_shift_monitor_rollback_restore_and_reset():
    rng = np.random.default_rng(4)
    cal = rng.normal(size=40)
    monitor = ShiftMonitor(cal, delta=0.05)
    for i, s in enumerate(rng.normal(size=30)):
        monitor.observe(float(s), bytes([i]) * 16)
    state, bag = monitor.state(), list(monitor._reference.bag)
    monitor.begin()
    for i, s in enumerate(rng.normal(size=5)):
        monitor.observe(float(s) + 5, bytes([100 + i]) * 16)
    monitor.rollback()
    assert monitor.state() == state and monitor._reference.bag == bag
    # Restored from what the store keeps (state, the scores that joined the bag, recent digests): the same test.
    stream_scores = sorted(set(bag) - set(cal.tolist()))
    again = ShiftMonitor.restore(cal, state, stream_scores, [bytes([i]) * 16 for i in range(30)])
    for i, s in enumerate(rng.normal(size=10)):
        a, b = monitor.observe(float(s), bytes([50 + i]) * 16), again.observe(float(s), bytes([50 + i]) * 16)
        assert a.p_value == b.p_value and a.log_martingale == pytest.approx(b.log_martingale, rel=1e-12)
    fresh = monitor.reset()
    assert fresh.epoch == monitor.epoch + 1 and fresh.log_martingale == pytest.approx(0.0) and not fresh.alarm
    assert len(fresh._reference) == cal.size
