"""Micro-batching and the durable answer: a model worker thread and a store writer thread.

Requests are decoded in the web server's threads and queued here as :class:`Job` s. The **model
worker** (one thread; it alone touches the models) waits for the first job, gathers the jobs for the
same model that arrive within ``max_wait_ms`` — up to ``max_batch_images`` images — and scores them
in one forward pass. The **store writer** then writes every record of the finished jobs (and the
shift monitor's update) in one transaction, commits it, and only then resolves the jobs' futures: a
response is never sent for a record that is not in the store, so ``kill -9`` of the server loses no
acknowledged request. While the writer commits one group, the worker scores the next.

Admission is bounded: at most ``max_queue_images`` images are waiting, being scored or being written;
a request that would pass it is refused at once (:class:`Overloaded`, answered 503 with
``Retry-After``), so overload sheds load instead of growing memory or latency without end.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from oodscope.serve.alarms import AlarmManager
from oodscope.serve.config import ServeConfig
from oodscope.serve.decode import Prepared
from oodscope.serve.metrics import ServiceMetrics
from oodscope.serve.runner import AnomalyMap, ServedModel
from oodscope.serve.store import Store

log = logging.getLogger("oodscope.serve")


class Overloaded(Exception):
    """The queue is full: come back in ``retry_after`` seconds."""

    def __init__(self, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.retry_after = int(retry_after)


class JobTimeout(Exception):
    """The job's deadline passed before it was scored."""


class ModelFailure(Exception):
    """The model raised while scoring a batch (not the images' fault: they decoded and were resized)."""


class StoreFailure(Exception):
    """The store transaction failed: nothing was acknowledged."""


class ShuttingDown(Exception):
    """The service is stopping and takes no new work."""


@dataclass
class Job:
    model: str
    items: list[Prepared]
    request_id: str
    deadline: float  #: time.monotonic() after which the job is not started
    maps: bool = False
    received: float = field(default_factory=time.monotonic)
    received_wall: float = field(default_factory=time.time)
    future: Future = field(default_factory=Future)

    @property
    def n(self) -> int:
        return len(self.items)


@dataclass
class ImageAnswer:
    """What the service answers for one image (and what the store keeps)."""

    index: int
    name: str
    content_hash: str | None
    score: float | None
    p_value: float | None
    ood: bool | None
    predicted_class: str | None
    class_probability: float | None
    prediction_set: list[str] | None
    error: str | None
    anomaly_map: AnomalyMap | None = None
    record_id: int | None = None
    shift_p_value: float | None = None


@dataclass
class JobResult:
    model: str
    fingerprint: str
    alpha: float
    answers: list[ImageAnswer]
    latency_ms: float
    batch_images: int
    alarm: bool
    log10_martingale: float


def _f(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


class Engine:
    """The model worker, the store writer and the bounded admission in front of them."""

    def __init__(self, models: dict[str, ServedModel], store: Store, alarms: AlarmManager, config: ServeConfig,
                 metrics: ServiceMetrics) -> None:
        self.models = models
        self.store, self.alarms, self.config, self.metrics = store, alarms, config, metrics
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._inflight = 0  # images admitted and not yet answered
        self._written: queue.Queue = queue.Queue()
        self._stopping = False
        self._swaps: dict[str, ServedModel] = {}
        self._threads: list[threading.Thread] = []
        self._recent_ood: dict[str, deque] = {}
        self._rate_lock = threading.Lock()
        self._images_per_second = 0.0  # smoothed service rate, for Retry-After
        self._last_prune = time.monotonic()
        self._cost: dict[int, float] = {}  # batch-size bucket (power of two) -> smoothed seconds per image
        self._batches = 0
        self.started = False
        self.worker_error: str | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        with self._cond:
            if self.started:
                return
            self.started, self._stopping = True, False
            self._threads = [threading.Thread(target=self._work, name="oodscope-model", daemon=True),
                             threading.Thread(target=self._write, name="oodscope-store", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what was admitted (scored and written), then stop both threads."""
        with self._cond:
            if not self.started:
                return
            self._stopping = True
            self._cond.notify_all()
        worker, writer = self._threads
        worker.join(timeout)
        self._written.put(None)
        writer.join(timeout)
        self.started = False

    @property
    def alive(self) -> bool:
        return self.started and all(t.is_alive() for t in self._threads) and not self._stopping

    @property
    def queue_depth(self) -> int:
        """Images waiting for the model."""
        with self._cond:
            return sum(j.n for j in self._jobs)

    @property
    def inflight(self) -> int:
        return self._inflight

    # ------------------------------------------------------------------ admission
    def submit(self, job: Job) -> Future:
        if not self.started:
            self.start()
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the service is shutting down")
            if job.model not in self.models:
                raise KeyError(job.model)
            limit = self.config.max_queue_images
            if self._inflight + job.n > limit:
                rate = self._images_per_second or 1.0
                retry = max(1, math.ceil((self._inflight + job.n - limit) / rate))
                raise Overloaded(min(retry, 60), f"the service is at capacity ({self._inflight} images in flight, "
                                                 f"limit {limit}); retry in {retry} s")
            self._inflight += job.n
            self._jobs.append(job)
            self._cond.notify_all()
        job.future.add_done_callback(lambda _f, n=job.n: self._release(n))
        return job.future

    def _release(self, n: int) -> None:
        with self._cond:
            self._inflight -= n

    def swap(self, served: ServedModel) -> None:
        """Serve ``served`` in place of the model of the same name, from the next batch on."""
        with self._cond:
            self._swaps[served.name] = served
            self._cond.notify_all()

    # ------------------------------------------------------------------ the model worker
    def batch_cap(self) -> int:
        """Images per forward pass for now: ``max_batch_images``, or with ``adaptive_batch`` the batch-size
        bucket (1, 2, 4, ...) whose measured time per image is lowest — one bucket larger every 16th pass, to
        keep measuring. On a CPU a larger batch is not always faster per image (memory-bound networks):
        the service measures it rather than assuming it."""
        cfg = self.config
        if not cfg.batching:
            return 1
        if not cfg.adaptive_batch or not self._cost:
            return cfg.max_batch_images
        best = min(self._cost, key=self._cost.get)
        if self._batches % 16 == 0:
            best *= 2
        return max(1, min(cfg.max_batch_images, 2 * best - 1))

    def _measured(self, n: int, seconds: float) -> None:
        bucket = 1 << (n.bit_length() - 1)
        per_image = seconds / n
        old = self._cost.get(bucket)
        self._cost[bucket] = per_image if old is None else 0.7 * old + 0.3 * per_image
        self._batches += 1

    def _next_batch(self) -> list[Job] | None:
        cfg = self.config
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._apply_swaps()
                self._cond.wait(0.25)
            self._apply_swaps()
            first = self._jobs[0]
            cap = self.batch_cap()
            if cfg.batching and first.n < cap:
                until = first.received + cfg.max_wait_ms / 1000.0
                while not self._stopping:
                    waiting = sum(j.n for j in self._jobs if j.model == first.model)
                    left = until - time.monotonic()
                    if waiting >= cap or left <= 0:
                        break
                    self._cond.wait(left)
            batch = [self._jobs.popleft()]
            if cfg.batching:
                total, keep = batch[0].n, deque()
                while self._jobs:
                    job = self._jobs.popleft()
                    if job.model == first.model and total + job.n <= cap:
                        batch.append(job)
                        total += job.n
                    else:
                        keep.append(job)
                self._jobs.extendleft(reversed(keep))
            return batch

    def _apply_swaps(self) -> None:
        for name, served in self._swaps.items():
            self.models[name] = served
        self._swaps.clear()

    def _work(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except Exception as err:  # noqa: BLE001 - keep the worker alive
                log.exception("batch gathering failed")
                self.worker_error = str(err)
                continue
            if batch is None:
                return
            try:
                self._score(batch)
            except Exception as err:  # noqa: BLE001 - a batch that fails fails its jobs, not the worker
                log.exception("scoring failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ModelFailure(f"the model failed on this batch ({type(err).__name__})"))

    def _score(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away (its wait was cancelled)
            if now > job.deadline:
                job.future.set_exception(JobTimeout("the request timed out before it was scored"))
                self.metrics.rejected.inc("timeout")
                continue
            live.append(job)
        if not live:
            return
        served = self.models[live[0].model]
        items = [item for job in live for item in job.items]
        maps_wanted = any(job.maps for job in live)
        started = time.monotonic()
        step = self.config.max_batch_images
        answers: list[ImageAnswer] = []
        for start in range(0, len(items), step):
            part = items[start:start + step]
            began = time.monotonic()
            predictions, maps = served.score(part, maps=maps_wanted)
            if any(item.ok for item in part):
                self._measured(sum(item.ok for item in part), time.monotonic() - began)
            for k, (item, row) in enumerate(zip(part, predictions.rows(), strict=True)):
                answers.append(ImageAnswer(
                    index=item.index, name=item.name, content_hash=item.digest.hex() if item.digest else None,
                    score=_f(row.score), p_value=_f(row.p_value), ood=row.ood, predicted_class=row.predicted_class,
                    class_probability=_f(row.class_probability), prediction_set=row.prediction_set,
                    error=row.error, anomaly_map=maps[k] if maps is not None else None))
        elapsed = time.monotonic() - started
        if elapsed > 0:
            rate = len(items) / elapsed
            old = self._images_per_second
            self._images_per_second = rate if not old else 0.8 * old + 0.2 * rate
        self.metrics.batch_images.observe(served.name, value=len(items))
        self.metrics.batch_requests.observe(served.name, value=len(live))
        done = time.monotonic()
        offset, per_job = 0, []
        for job in live:
            mine = answers[offset:offset + job.n]
            offset += job.n
            for a in mine:
                if not job.maps:
                    a.anomaly_map = None
            per_job.append((job, mine, (done - job.received) * 1000.0))
        self._written.put((served, per_job, len(items)))

    # ------------------------------------------------------------------ the store writer
    def _write(self) -> None:
        stop = False
        while not stop:
            first = self._written.get()
            groups = []
            if first is None:
                stop = True
            else:
                groups.append(first)
            while True:  # group commit: everything finished so far goes in one transaction
                try:
                    more = self._written.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                else:
                    groups.append(more)
            if groups:
                try:
                    self._commit(groups)
                except Exception as err:  # noqa: BLE001 - the writer must survive a failed transaction
                    log.exception("store write failed")
                    self.metrics.store_errors.inc()
                    for _served, per_job, _n in groups:
                        for job, _answers, _ms in per_job:
                            if not job.future.done():
                                job.future.set_exception(StoreFailure(f"the store could not be written "
                                                                      f"({type(err).__name__})"))
            self._maybe_prune()

    def _commit(self, groups: list[tuple[ServedModel, list, int]]) -> None:
        rows: list[dict[str, Any]] = []
        blobs: list[bytes | None] = []
        shift_rows: list[dict[str, Any]] = []
        alarm_rows: list[dict[str, Any]] = []
        raised: list[str] = []
        touched: dict[str, Any] = {}
        names = {served.name for served, _p, _n in groups}
        with self.alarms.lock:
            for name in names:
                self.alarms.monitors[name].begin()
            try:
                for served, per_job, _n in groups:
                    monitor = self.alarms.monitors[served.name]
                    # Results of a model that was swapped out meanwhile are recorded, not tested against
                    # the new model's calibration.
                    tested = self.alarms.fingerprints.get(served.name) == served.fingerprint
                    touched[served.name] = (served, monitor)
                    for job, answers, latency_ms in per_job:
                        for a, item in zip(answers, job.items, strict=True):
                            log_m = p_shift = None
                            if tested and a.error is None and a.score is not None:
                                obs = monitor.observe(a.score, item.digest, now=time.time())
                                p_shift, log_m = obs.p_value, obs.log_martingale
                                if obs.p_value is not None:
                                    shift_rows.append({"model": served.name, "epoch": monitor.epoch, "score": a.score,
                                                       "content_hash": a.content_hash})
                                if obs.raised:
                                    alarm_rows.append(self.alarms.raised_event(served.name, monitor, len(rows)))
                                    raised.append(served.name)
                            a.shift_p_value = p_shift
                            rows.append({
                                "time": job.received_wall, "request_id": job.request_id, "item": a.name[:512],
                                "model": served.name, "model_fingerprint": served.fingerprint,
                                "content_hash": a.content_hash, "score": a.score, "p_value": a.p_value, "ood": a.ood,
                                "predicted_class": a.predicted_class, "class_probability": a.class_probability,
                                "prediction_set": None if a.prediction_set is None else json.dumps(a.prediction_set),
                                "error": a.error, "latency_ms": latency_ms, "shift_p_value": p_shift,
                                "shift_log_martingale": _f(log_m),
                            })
                            blobs.append(item.raw if self.config.store_images else None)
                states = [{"model": name, "model_fingerprint": served.fingerprint, "epoch": monitor.epoch,
                           "state": monitor.state()} for name, (served, monitor) in touched.items()
                          if self.alarms.fingerprints.get(name) == served.fingerprint]
                started = time.monotonic()
                ids = self.store.write_batch(rows, image_data=blobs, shift_rows=shift_rows, states=states,
                                             alarm_rows=alarm_rows)
                self.metrics.store_seconds.observe(value=time.monotonic() - started)
            except BaseException:
                for name in names:
                    self.alarms.monitors[name].rollback()
                raise
            for name in names:
                self.alarms.monitors[name].commit()
        k = 0
        for served, per_job, n in groups:
            monitor = self.alarms.monitors[served.name]
            for job, answers, latency_ms in per_job:
                for a in answers:
                    a.record_id = ids[k]
                    k += 1
                self._count(served.name, answers)
                if not job.future.done():
                    job.future.set_result(JobResult(served.name, served.fingerprint, served.alpha, answers, latency_ms,
                                                    n, monitor.alarm, monitor.log10_martingale))
        for name in raised:
            self.alarms.notify("raised", name, self.alarms.monitors[name])

    def _count(self, name: str, answers: list[ImageAnswer]) -> None:
        ok = [a for a in answers if a.error is None]
        self.metrics.images.inc(name, "ok", amount=len(ok))
        if len(ok) < len(answers):
            self.metrics.images.inc(name, "error", amount=len(answers) - len(ok))
        flagged = sum(1 for a in ok if a.ood)
        if flagged:
            self.metrics.flagged.inc(name, amount=flagged)
        with self._rate_lock:
            window = self._recent_ood.setdefault(name, deque(maxlen=self.config.ood_rate_window))
            window.extend(bool(a.ood) for a in ok)

    def ood_rates(self) -> dict[str, float]:
        """OOD rate over the last ``ood_rate_window`` scored images, per model."""
        with self._rate_lock:
            return {name: (sum(w) / len(w)) for name, w in self._recent_ood.items() if w}

    def _maybe_prune(self) -> None:
        cfg = self.config
        if cfg.retention_days is None and cfg.retention_records is None:
            return
        if time.monotonic() - self._last_prune < cfg.prune_interval_s:
            return
        self._last_prune = time.monotonic()
        try:
            older = None if cfg.retention_days is None else time.time() - cfg.retention_days * 86400.0
            self.store.prune(older_than=older, keep_records=cfg.retention_records)
        except Exception:  # noqa: BLE001 - retention is best effort; the next round tries again
            log.exception("retention pruning failed")


__all__ = ["Engine", "ImageAnswer", "Job", "JobResult", "JobTimeout", "ModelFailure", "Overloaded", "ShuttingDown",
           "StoreFailure"]
