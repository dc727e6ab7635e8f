"""The shift alarms of the served models: one :class:`~oodscope.serve.martingale.ShiftMonitor` per model,
kept in step with the store, and an optional webhook told when an alarm is raised or reset.

The monitor of a model is restored from the store at start-up (its state, the reference scores of its
epoch), so a restart — even after ``kill -9`` — continues the same test: the state is written in the
same transaction as the records it has seen. A model with another fingerprint than the saved state
(a new or retrained model) starts a new epoch: the test is against the new model's calibration.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from oodscope.serve.martingale import DEFAULT_DELTA, DEFAULT_JUMP, DEFAULT_KAPPAS, ShiftMonitor
from oodscope.serve.store import Store

log = logging.getLogger("oodscope.serve")


@dataclass
class AlarmSettings:
    delta: float = DEFAULT_DELTA
    jump: float = DEFAULT_JUMP
    kappas: tuple[float, ...] = DEFAULT_KAPPAS
    dedupe_window: int = 10_000
    webhook_url: str | None = None
    webhook_timeout_s: float = 5.0
    webhook_attempts: int = 3


class Webhook:
    """POSTs a JSON event to a URL from a background thread (``attempts`` tries, 0.5 s, 1 s, ... apart)."""

    def __init__(self, url: str, timeout_s: float = 5.0, attempts: int = 3, on_result=None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the webhook URL must start with http:// or https://, got {url!r}")
        self.url, self.timeout_s, self.attempts = url, float(timeout_s), max(1, int(attempts))
        self.on_result = on_result
        self._threads: list[threading.Thread] = []

    def send(self, event: dict[str, Any]) -> threading.Thread:
        thread = threading.Thread(target=self._deliver, args=(event,), name="oodscope-webhook", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return thread

    def _deliver(self, event: dict[str, Any]) -> None:
        body = json.dumps(event, default=str).encode()
        for attempt in range(self.attempts):
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json",
                                                      "User-Agent": "oodscope-serve"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - operator's URL
                    if 200 <= response.status < 300:
                        self._result("delivered")
                        return
            except (urllib.error.URLError, OSError, ValueError) as err:
                log.warning("alarm webhook %s: attempt %d failed: %s", self.url, attempt + 1, err)
            time.sleep(0.5 * (2**attempt))
        self._result("failed")

    def _result(self, outcome: str) -> None:
        if self.on_result is not None:
            self.on_result(outcome)

    def join(self, timeout: float = 5.0) -> None:
        for t in list(self._threads):
            t.join(timeout)


class AlarmManager:
    """Monitors by model name. ``lock`` is held by whoever changes them (the store writer, a reset)."""

    def __init__(self, store: Store, settings: AlarmSettings | None = None, on_webhook=None) -> None:
        self.store = store
        self.settings = settings or AlarmSettings()
        self.monitors: dict[str, ShiftMonitor] = {}
        self.fingerprints: dict[str, str] = {}
        self.lock = threading.RLock()
        s = self.settings
        self.webhook = Webhook(s.webhook_url, s.webhook_timeout_s, s.webhook_attempts, on_webhook) \
            if s.webhook_url else None

    def _options(self) -> dict[str, Any]:
        s = self.settings
        return {"delta": s.delta, "jump": s.jump, "kappas": s.kappas, "dedupe_window": s.dedupe_window}

    def attach(self, name: str, fingerprint: str, calibration_scores: Any) -> ShiftMonitor:
        """The monitor of a model: restored from the store when it tests this fingerprint, else a new epoch."""
        with self.lock:
            saved, bag, recent = self.store.load_monitor(name)
            cal = [float(x) for x in calibration_scores]
            if saved is not None and saved.get("_fingerprint") == fingerprint:
                state = {k: v for k, v in saved.items() if not k.startswith("_")}
                monitor = ShiftMonitor.restore(cal, state, bag, recent, dedupe_window=self.settings.dedupe_window)
            else:
                epoch = 1 if saved is None else int(saved.get("epoch", 0)) + 1
                monitor = ShiftMonitor(cal, epoch=epoch, **self._options())
                reason = "first start" if saved is None else f"new model fingerprint (was {saved.get('_fingerprint')})"
                self.store.reset_monitor(name, fingerprint, monitor.epoch, monitor.state(),
                                         self._event(name, fingerprint, monitor, "started", {"reason": reason}))
            self.monitors[name] = monitor
            self.fingerprints[name] = fingerprint
            return monitor

    def reset(self, name: str, who: str | None = None, **settings: Any) -> ShiftMonitor:
        """A new test for ``name`` (the alarm cleared, M = 1, the bag back to the calibration set)."""
        with self.lock:
            old = self.monitors[name]
            fresh = old.reset(**({k: v for k, v in self._options().items() if k not in settings} | settings))
            detail = {"by": who, "previous_epoch": old.epoch, "previous_alarm": old.alarm,
                      "previous_log10_martingale": old.log10_martingale, "previous_n_observed": old.n_observed}
            self.store.reset_monitor(name, self.fingerprints[name], fresh.epoch, fresh.state(),
                                     self._event(name, self.fingerprints[name], fresh, "reset", detail))
            self.monitors[name] = fresh
        self.notify("reset", name, fresh, detail)
        return fresh

    def _event(self, name: str, fingerprint: str, monitor: ShiftMonitor, event: str,
               detail: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"time": time.time(), "model": name, "model_fingerprint": fingerprint, "event": event,
                "epoch": monitor.epoch, "log_martingale": monitor.log_martingale, "threshold": monitor.threshold,
                "delta": monitor.delta, "n_observed": monitor.n_observed,
                "detail": json.dumps(detail or {}, default=str)}

    def raised_event(self, name: str, monitor: ShiftMonitor, row_index: int) -> dict[str, Any]:
        event = self._event(name, self.fingerprints[name], monitor, "raised")
        event["row_index"] = row_index
        return event

    def notify(self, event: str, name: str, monitor: ShiftMonitor, detail: dict[str, Any] | None = None) -> None:
        if self.webhook is None:
            return
        payload = {"event": f"shift_alarm_{event}", "model": name, "model_fingerprint": self.fingerprints.get(name),
                   **monitor.describe(), "detail": detail or {}}
        payload["log10_martingale"] = round(payload["log10_martingale"], 6)
        if not math.isfinite(payload["log10_martingale"]):
            payload["log10_martingale"] = None
        self.webhook.send(payload)

    def states(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {name: {"model_fingerprint": self.fingerprints[name], **m.describe()}
                    for name, m in self.monitors.items()}


__all__ = ["AlarmManager", "AlarmSettings", "Webhook"]
