"""The typed request and response bodies of the service (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ImageIn(BaseModel):
    name: str | None = Field(None, max_length=1024, description="a name for the image (echoed back; default "
                                                               "image-<index>)")
    data: str = Field(..., description="the encoded image file (PNG, JPEG, WebP, BMP, TIFF, GIF), base64",
                      json_schema_extra={"format": "byte"})


class ScoreRequest(BaseModel):
    """JSON form of a scoring request (``Content-Type: application/json``)."""

    images: list[ImageIn] = Field(..., min_length=1, description="one or more images")
    maps: bool = Field(False, description="also return an anomaly map per image (for map methods)")


class AnomalyMapOut(BaseModel):
    png_base64: str = Field(..., description="8-bit greyscale PNG, base64; 0 = low, 255 = high")
    width: int
    height: int
    low: float = Field(..., description="the map value shown as 0")
    high: float = Field(..., description="the map value shown as 255")


class ImageResult(BaseModel):
    """The answer for one image. ``error`` is set (and every decision field null) when it could not be read."""

    index: int = Field(..., description="position in the request")
    name: str
    content_hash: str | None = Field(None, description="BLAKE2b-128 of the uploaded bytes, hex")
    score: float | None = Field(None, description="detector score, higher = more OOD")
    p_value: float | None = Field(None, description="conformal p-value against the ID calibration scores")
    ood: bool | None = Field(None, description="flagged OOD: p_value <= alpha")
    predicted_class: str | None = None
    class_probability: float | None = None
    prediction_set: list[str] | None = Field(None, description="conformal set of ID classes (empty when flagged)")
    anomaly_map: AnomalyMapOut | None = Field(None, description="only for map methods, when asked (maps)")
    error: str | None = Field(None, description="why the image could not be scored")
    record_id: int | None = Field(None, description="the store record of this answer")


class ScoreResponse(BaseModel):
    request_id: str
    model: str
    model_fingerprint: str
    alpha: float
    n_images: int
    n_errors: int
    n_flagged: int
    latency_ms: float
    batch_images: int = Field(..., description="images in the forward pass that scored this request")
    maps_available: bool
    shift_alarm: bool = Field(..., description="the model's shift alarm is raised")
    results: list[ImageResult]


class ModelCard(BaseModel):
    name: str
    fingerprint: str
    maps_available: bool
    summary: dict[str, Any] = Field(..., description="OODModel.summary(): backbone, method, classes, calibration, "
                                                     "threshold, prediction sets")
    description: str


class ModelList(BaseModel):
    default: str
    models: list[ModelCard]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    checks: dict[str, Any]


class ErrorResponse(BaseModel):
    detail: str
    code: str
    request_id: str | None = None


class AlarmState(BaseModel):
    model_fingerprint: str | None = None
    epoch: int
    alarm: bool
    raised_at: float | None = None
    n_observed: int
    log10_martingale: float | None = None
    peak_log10_martingale: float | None = None
    threshold: float
    delta: float
    statistic: str


class AlarmsResponse(BaseModel):
    models: dict[str, AlarmState]
    history: list[dict[str, Any]]


class ReloadResponse(BaseModel):
    model: str
    fingerprint: str
    previous_fingerprint: str


__all__ = ["AlarmState", "AlarmsResponse", "AnomalyMapOut", "ErrorResponse", "Health", "ImageIn", "ImageResult",
           "ModelCard", "ModelList", "Ready", "ReloadResponse", "ScoreRequest", "ScoreResponse"]
