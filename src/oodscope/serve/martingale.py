"""Shift alarms that hold their false-alarm rate: a conformal test martingale on the scored stream.

The statistic (see ``docs/serve.md``):

1. **Online conformal p-values.** The reference bag starts as the model's ID calibration scores; each
   scored image gets the smoothed conformal p-value of its score against the bag, and then joins it:

       p_t = (#{b in bag : b > s_t} + theta_t * (#{b in bag : b = s_t} + 1)) / (|bag| + 1),

   with ``theta_t`` uniform in [0, 1) (a keyed hash of the image's content, so a replay gives the same
   value). If the calibration images and the stream are exchangeable — the stream is still ID — these
   p-values are independent and exactly uniform (Vovk, Gammerman & Shafer, *Algorithmic Learning in a
   Random World*, 2005, Theorem 8.2; Vovk, Nouretdinov & Gammerman, "Testing exchangeability
   on-line", ICML 2003). P-values against the *fixed* calibration set would not do: they share the
   calibration set, are dependent, and a long stream would reveal an unlucky calibration set as if it
   were a shift.
2. **Betting.** Power calibrators ``f_k(p) = k * p^(k - 1)``, ``k`` in :data:`DEFAULT_KAPPAS`, bet that
   p-values are small (scores higher than at calibration: more OOD). Each has ``E f_k(U) = 1`` for
   uniform ``U`` (and ``<= 1`` for any super-uniform p-value), ``k = 1`` is "no bet". A *jumper*
   mixture (Vovk, Petej, Nouretdinov, Ahlberg, Carlsson & Gammerman, "Retrain or not retrain:
   conformal test martingales for change-point detection", COPA 2021) keeps one capital per ``k``;
   before each bet a fraction ``jump`` of the total capital is spread evenly over all of them, so the
   capital that slept through a long ID stretch can start betting as soon as the stream changes.
   The total capital ``M_t`` (``M_0 = 1``) is a non-negative martingale under the null.
3. **Alarm.** By Ville's inequality ``P(sup_t M_t >= 1 / delta) <= delta``: an alarm raised when
   ``M_t >= 1 / delta`` fires on an unshifted stream with probability at most ``delta``, however long
   the stream runs and however often it is looked at (anytime-valid). The alarm latches until it is
   reset, which starts a new test (a new epoch: the bag is the calibration set again).

Everything here is vectorised over independent streams (a leading axis) so that the statistical
tests replay thousands of streams with the very code the service runs.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Power-calibrator exponents of the jumper mixture; 1.0 is "no bet" (f = 1).
DEFAULT_KAPPAS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
#: Fraction of the capital spread evenly over the bets before each step.
DEFAULT_JUMP = 0.01
DEFAULT_DELTA = 0.01


def content_theta(digest: bytes, key: bytes = b"oodscope-shift-theta") -> float:
    """The tie-breaking uniform ``theta`` of an image: 53 bits of a keyed BLAKE2b of its content hash."""
    word = int.from_bytes(hashlib.blake2b(digest, digest_size=8, key=key).digest(), "little") >> 11
    return word * 2.0**-53


class OnlineConformal:
    """Smoothed online conformal p-values against a growing bag (calibration scores + the stream)."""

    def __init__(self, calibration_scores: Iterable[float]) -> None:
        cal = [float(s) for s in calibration_scores]
        if not cal or not all(math.isfinite(s) for s in cal):
            raise ValueError("the reference bag needs at least one calibration score, all finite")
        self.bag: list[float] = sorted(cal)

    def __len__(self) -> int:
        return len(self.bag)

    def p_value(self, score: float, theta: float) -> float:
        """The p-value of ``score`` against the bag (the bag is not changed)."""
        lo = bisect.bisect_left(self.bag, score)
        hi = bisect.bisect_right(self.bag, score)
        greater, equal = len(self.bag) - hi, hi - lo
        return (greater + theta * (equal + 1)) / (len(self.bag) + 1)

    def push(self, score: float, theta: float) -> float:
        """The p-value of ``score``, which then joins the bag."""
        p = self.p_value(score, theta)
        bisect.insort(self.bag, float(score))
        return p

    def remove(self, score: float) -> None:
        """Take one copy of ``score`` out of the bag (undo of :meth:`push`)."""
        i = bisect.bisect_left(self.bag, score)
        if i < len(self.bag) and self.bag[i] == score:
            del self.bag[i]


def online_p_values(calibration: Sequence[float], stream: Sequence[float], thetas: Sequence[float]) -> np.ndarray:
    """The p-values :class:`OnlineConformal` gives a whole stream (what the service computes, one by one)."""
    ref = OnlineConformal(calibration)
    return np.array([ref.push(float(s), float(t)) for s, t in zip(stream, thetas, strict=True)], dtype=np.float64)


def _logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(a - m), axis=axis))


class PowerJumper:
    """The jumper mixture of power calibrators, for ``streams`` independent streams at once.

    ``log_capital``: (streams, len(kappas)) natural logs of each bet's capital; the martingale is
    ``M = sum(exp(log_capital), axis=-1)``, ``M_0 = 1``.
    """

    def __init__(self, streams: int = 1, kappas: Sequence[float] = DEFAULT_KAPPAS, jump: float = DEFAULT_JUMP) -> None:
        k = np.asarray(kappas, dtype=np.float64)
        if k.ndim != 1 or k.size == 0 or (k <= 0).any() or (k > 1).any():
            raise ValueError(f"kappas must be exponents in (0, 1], got {list(kappas)}")
        if not 0.0 <= jump <= 1.0:
            raise ValueError(f"jump must be in [0, 1], got {jump}")
        self.kappas = k
        self.jump = float(jump)
        self.log_capital = np.full((int(streams), k.size), -math.log(k.size))

    @property
    def log_value(self) -> np.ndarray:
        """``log M_t`` per stream."""
        return _logsumexp(self.log_capital)

    def update(self, p: Any) -> np.ndarray:
        """Bet on one p-value per stream (``p``: shape (streams,) or a scalar); returns ``log M_t``."""
        p = np.clip(np.asarray(p, dtype=np.float64).reshape(-1, 1), 1e-300, 1.0)
        total = _logsumexp(self.log_capital)[:, None]
        if self.jump > 0.0:
            share = total + math.log(self.jump / self.kappas.size)
            kept = self.log_capital + math.log1p(-self.jump) if self.jump < 1.0 else np.full_like(self.log_capital,
                                                                                                   -np.inf)
            mixed = np.logaddexp(kept, share)
        else:
            mixed = self.log_capital
        self.log_capital = mixed + np.log(self.kappas) + (self.kappas - 1.0) * np.log(p)
        return self.log_value

    def run(self, p_values: np.ndarray) -> np.ndarray:
        """``log M_t`` after each step of (streams, T) p-values: an array (streams, T)."""
        p_values = np.atleast_2d(np.asarray(p_values, dtype=np.float64))
        out = np.empty(p_values.shape)
        for t in range(p_values.shape[1]):
            out[:, t] = self.update(p_values[:, t])
        return out

    def state(self) -> list[list[float]]:
        return self.log_capital.tolist()

    def set_state(self, log_capital: Sequence[Sequence[float]]) -> None:
        arr = np.asarray(log_capital, dtype=np.float64)
        if arr.shape != self.log_capital.shape:
            raise ValueError(f"state has shape {arr.shape}, expected {self.log_capital.shape}")
        self.log_capital = arr


def first_alarm(log_martingale: np.ndarray, delta: float) -> np.ndarray:
    """Index of the first step with ``M_t >= 1 / delta`` per stream, -1 where it never comes."""
    hit = np.atleast_2d(log_martingale) >= math.log(1.0 / delta)
    first = hit.argmax(axis=1)
    return np.where(hit.any(axis=1), first, -1)


@dataclass
class Observation:
    """What the monitor made of one scored image."""

    p_value: float | None  #: the online conformal p-value (None: skipped — a repeat of a recent image)
    log_martingale: float
    raised: bool  #: this observation raised the alarm


@dataclass
class ShiftMonitor:
    """The alarm of one served model: online p-values -> jumper martingale -> ``M >= 1 / delta``.

    ``observe`` is called once per scored image, in the order the store records them. Images whose
    content was seen among the last ``dedupe_window`` observations are skipped (a client retrying the
    same image is not new evidence; under the null, repeats have probability 0, so skipping them by
    content does not change the test). ``begin`` / ``rollback`` undo what a batch did when its store
    transaction fails, so the monitor stays what the store says.
    """

    calibration_scores: Sequence[float]
    delta: float = DEFAULT_DELTA
    kappas: Sequence[float] = DEFAULT_KAPPAS
    jump: float = DEFAULT_JUMP
    dedupe_window: int = 10_000
    epoch: int = 1
    n_observed: int = 0
    alarm: bool = False
    raised_at: float | None = None
    peak_log_martingale: float = 0.0
    _reference: OnlineConformal = field(init=False, repr=False)
    _bet: PowerJumper = field(init=False, repr=False)
    _recent: dict[bytes, None] = field(init=False, repr=False, default_factory=dict)
    _undo: dict[str, Any] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        self._reference = OnlineConformal(self.calibration_scores)
        self._bet = PowerJumper(1, self.kappas, self.jump)

    # ------------------------------------------------------------------ the test
    @property
    def threshold(self) -> float:
        return 1.0 / self.delta

    @property
    def log_martingale(self) -> float:
        return float(self._bet.log_value[0])

    @property
    def log10_martingale(self) -> float:
        return self.log_martingale / math.log(10.0)

    def observe(self, score: float, digest: bytes, now: float | None = None) -> Observation:
        if not math.isfinite(score) or digest in self._recent:
            return Observation(None, self.log_martingale, False)
        self._remember(digest)
        p = self._reference.push(score, content_theta(digest))
        if self._undo is not None:
            self._undo["pushed"].append(score)
        log_m = float(self._bet.update(p)[0])
        self.n_observed += 1
        self.peak_log_martingale = max(self.peak_log_martingale, log_m)
        raised = False
        if not self.alarm and log_m >= math.log(self.threshold):
            self.alarm, self.raised_at, raised = True, now, True
        return Observation(p, log_m, raised)

    def _remember(self, digest: bytes) -> None:
        if self.dedupe_window <= 0:
            return
        self._recent[digest] = None
        if len(self._recent) > self.dedupe_window:
            del self._recent[next(iter(self._recent))]

    # ------------------------------------------------------------------ transactions
    def begin(self) -> None:
        self._undo = {"state": self.state(), "pushed": [], "recent": dict(self._recent)}

    def commit(self) -> None:
        self._undo = None

    def rollback(self) -> None:
        if self._undo is None:
            return
        undo, self._undo = self._undo, None
        for score in undo["pushed"]:
            self._reference.remove(score)
        self._recent = undo["recent"]
        self._load_state(undo["state"])

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """JSON-able state (the bag is kept apart: the store has one row per score that joined it)."""
        return {"epoch": self.epoch, "n_observed": self.n_observed, "alarm": self.alarm, "raised_at": self.raised_at,
                "peak_log_martingale": self.peak_log_martingale, "log_capital": self._bet.state(),
                "delta": self.delta, "kappas": list(self.kappas), "jump": self.jump}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.n_observed = int(state["n_observed"])
        self.alarm = bool(state["alarm"])
        self.raised_at = state.get("raised_at")
        self.peak_log_martingale = float(state.get("peak_log_martingale", 0.0))
        self._bet.set_state(state["log_capital"])

    @classmethod
    def restore(cls, calibration_scores: Sequence[float], state: dict[str, Any], bag_scores: Iterable[float],
                recent: Iterable[bytes] = (), **settings: Any) -> ShiftMonitor:
        """A monitor as it was: its saved state, the stream scores that joined the bag, recent digests.

        The saved test's settings (delta, kappas, jump) win over ``settings``: a running test is not
        changed under its feet (a reset starts one with the new settings).
        """
        for name in ("delta", "kappas", "jump"):
            if name in state:
                settings[name] = state[name]
        monitor = cls(calibration_scores, **settings)
        monitor._load_state(state)
        for s in bag_scores:
            bisect.insort(monitor._reference.bag, float(s))
        for d in recent:
            monitor._remember(d)
        return monitor

    def reset(self, **settings: Any) -> ShiftMonitor:
        """A fresh test (next epoch): the bag is the calibration set again, ``M = 1``, no alarm."""
        options = {"delta": self.delta, "kappas": self.kappas, "jump": self.jump, "dedupe_window": self.dedupe_window}
        options.update(settings)
        return ShiftMonitor(self.calibration_scores, epoch=self.epoch + 1, **options)

    def describe(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "alarm": self.alarm, "raised_at": self.raised_at, "n_observed": self.n_observed,
            "log10_martingale": self.log10_martingale, "peak_log10_martingale": self.peak_log_martingale / math.log(10),
            "threshold": self.threshold, "delta": self.delta, "statistic": "jumper mixture of power calibrators on "
            "online conformal p-values (alarm when M >= 1/delta)",
        }


__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_JUMP",
    "DEFAULT_KAPPAS",
    "Observation",
    "OnlineConformal",
    "PowerJumper",
    "ShiftMonitor",
    "content_theta",
    "first_alarm",
    "online_p_values",
]
