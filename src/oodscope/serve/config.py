"""The service's settings, with their defaults and checks (``oodscope serve`` flags map onto these)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

from oodscope.serve.martingale import DEFAULT_DELTA, DEFAULT_JUMP, DEFAULT_KAPPAS


@dataclass
class ServeConfig:
    """Limits, batching, storage and alarm settings of one app.

    Batching: requests are gathered for up to ``max_wait_ms`` after the first one waiting, into one
    forward pass of at most ``max_batch_images`` images (``batching=False``: one request per pass).
    Overload: at most ``max_queue_images`` images wait or are being scored; a request beyond that is
    answered 503 with ``Retry-After``. A request is answered 504 when it is not done after
    ``request_timeout_s`` (its images are not scored if they had not started).
    """

    max_batch_images: int = 64
    max_wait_ms: float = 5.0
    batching: bool = True
    adaptive_batch: bool = True
    max_queue_images: int = 512
    max_images_per_request: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    request_timeout_s: float = 30.0
    decode_threads: int = max(2, os.cpu_count() or 2)
    store_images: bool = False
    store_sync: str = "full"
    retention_days: float | None = None
    retention_records: int | None = None
    prune_interval_s: float = 300.0
    shift_delta: float = DEFAULT_DELTA
    shift_jump: float = DEFAULT_JUMP
    shift_kappas: tuple[float, ...] = DEFAULT_KAPPAS
    shift_dedupe_window: int = 10_000
    webhook_url: str | None = None
    webhook_timeout_s: float = 5.0
    ood_rate_window: int = 1000
    metrics_require_key: bool = True

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        positive_ints = ("max_batch_images", "max_queue_images", "max_images_per_request", "max_body_bytes",
                         "max_pixels", "decode_threads", "ood_rate_window")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("max_wait_ms", "request_timeout_s", "prune_interval_s", "webhook_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if not 0.0 < self.shift_delta < 1.0:
            raise ValueError(f"shift_delta must be in (0, 1), got {self.shift_delta}")
        if not 0.0 <= self.shift_jump <= 1.0:
            raise ValueError(f"shift_jump must be in [0, 1], got {self.shift_jump}")
        if self.retention_days is not None and not self.retention_days > 0:
            raise ValueError(f"retention_days must be > 0, got {self.retention_days}")
        if self.retention_records is not None and self.retention_records < 1:
            raise ValueError(f"retention_records must be >= 1, got {self.retention_records}")
        if self.max_images_per_request > self.max_queue_images:
            raise ValueError("max_images_per_request must not exceed max_queue_images (such a request could never "
                             "be admitted)")
        if self.store_sync not in ("full", "normal"):
            raise ValueError(f"store_sync must be 'full' or 'normal', got {self.store_sync!r}")
        if self.webhook_url is not None and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url must start with http:// or https://, got {self.webhook_url!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


__all__ = ["ServeConfig"]
