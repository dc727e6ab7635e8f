"""What the store says about the served models, for ``oodscope monitor`` and ``GET /v1/monitor``.

Per model: totals, the OOD rate over time (fixed time buckets), the score distribution of recent
images against the calibration scores (a shared histogram and the two-sample Kolmogorov-Smirnov
distance), the most recent flagged images, the alarm state and the alarm history.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import numpy as np

from oodscope.serve.store import Store


def _histogram(now: list[float], calibration: list[float] | None, bins: int = 20) -> dict[str, Any] | None:
    values = np.asarray(now, dtype=np.float64)
    cal = np.asarray(calibration or [], dtype=np.float64)
    both = np.concatenate([values, cal])
    both = both[np.isfinite(both)]
    if both.size == 0:
        return None
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    out: dict[str, Any] = {"edges": edges.tolist(), "now": np.histogram(values, edges)[0].tolist(),
                           "calibration": np.histogram(cal, edges)[0].tolist() if cal.size else None,
                           "n_now": int(values.size), "n_calibration": int(cal.size)}
    if values.size and cal.size:
        grid = np.sort(both)
        ecdf_now = np.searchsorted(np.sort(values), grid, side="right") / values.size
        ecdf_cal = np.searchsorted(np.sort(cal), grid, side="right") / cal.size
        out["ks_distance"] = float(np.max(np.abs(ecdf_now - ecdf_cal)))
        out["median_now"], out["median_calibration"] = float(np.median(values)), float(np.median(cal))
    return out


def summarize(store: Store, *, model: str | None = None, bucket_seconds: float = 3600.0, buckets: int = 24,
              recent_scores: int = 1000, flagged: int = 10, alarms: int = 20) -> dict[str, Any]:
    """Everything the monitoring views show, as JSON-able data."""
    served = {}
    for m in store.served_models():
        served.setdefault(m["name"], []).append(m)
    states = {s["model"]: s for s in store.monitor_states()}
    names = [model] if model is not None else store.model_names()
    out = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "models": []}
    for name in names:
        versions = served.get(name, [])
        latest = versions[-1] if versions else None
        state = states.get(name)
        alarm_state = None
        if state is not None:
            s = state["state"]
            log_m = _log_m(s)
            alarm_state = {"epoch": state["epoch"], "model_fingerprint": state["model_fingerprint"],
                           "alarm": bool(s.get("alarm")), "raised_at": s.get("raised_at"),
                           "n_observed": s.get("n_observed"), "delta": s.get("delta"),
                           "threshold": 1.0 / s["delta"] if s.get("delta") else None,
                           "log10_martingale": None if log_m is None else log_m / math.log(10)}
        history = []
        for a in store.alarm_history(name, limit=alarms):
            a = dict(a)
            a["detail"] = json.loads(a["detail"]) if a.get("detail") else {}
            a["log10_martingale"] = None if a.get("log_martingale") is None else a["log_martingale"] / math.log(10)
            history.append(a)
        recent_flagged = [{k: r[k] for k in ("id", "time", "request_id", "item", "content_hash", "score", "p_value",
                                             "predicted_class", "model_fingerprint")}
                          for r in store.recent(model=name, limit=flagged, flagged=True)]
        out["models"].append({
            "name": name,
            "fingerprints": [v["fingerprint"] for v in versions],
            "alpha": None if latest is None else latest["alpha"],
            "totals": store.totals(name),
            "ood_rate": store.ood_rate_series(name, bucket_seconds, buckets=buckets),
            "bucket_seconds": bucket_seconds,
            "scores": _histogram(store.scores(name, limit=recent_scores),
                                 None if latest is None else latest["calibration_scores"]),
            "recent_flagged": recent_flagged,
            "alarm": alarm_state,
            "alarm_history": history,
        })
    return out


def _log_m(state: dict[str, Any]) -> float | None:
    capital = state.get("log_capital")
    if not capital:
        return None
    row = np.asarray(capital[0], dtype=np.float64)
    m = float(row.max())
    return m + math.log(float(np.exp(row - m).sum()))


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _bar(fraction: float | None, width: int = 20) -> str:
    if fraction is None:
        return ""
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "#" * filled + "." * (width - filled)


def render_text(summary: dict[str, Any]) -> str:
    """The summary as text for a terminal (``oodscope monitor``)."""
    lines = [f"oodscope monitor — {summary['generated']}"]
    if not summary["models"]:
        lines.append("the store holds no scored image yet")
    for m in summary["models"]:
        t = m["totals"]
        lines += ["", f"model {m['name']}  (fingerprint {', '.join(m['fingerprints']) or 'unknown'}; "
                      f"alpha = {m['alpha'] if m['alpha'] is not None else '?'})",
                  f"  records        {t['records']} ({t['flagged']} flagged OOD, {t['errors']} unreadable), "
                  f"{_when(t['first'])} .. {_when(t['last'])} UTC"]
        a = m["alarm"]
        if a is not None:
            verdict = (f"RAISED at {_when(a['raised_at'])} UTC" if a["alarm"] else "quiet")
            lm = a["log10_martingale"]
            lines.append(f"  shift alarm    {verdict}: log10 M = {lm:.3f} against log10(1/delta) = "
                         f"{math.log10(a['threshold']):.3f} (delta = {a['delta']:g}), {a['n_observed']} image(s) in "
                         f"test epoch {a['epoch']}" if lm is not None else f"  shift alarm    {verdict}")
        lines.append(f"  OOD rate per {m['bucket_seconds']:g} s (UTC bucket start, images, flagged, rate):")
        if not m["ood_rate"]:
            lines.append("    (no scored image)")
        for b in m["ood_rate"]:
            rate = b["ood_rate"]
            lines.append(f"    {_when(b['start'])}  {b['n']:7d}  {b['flagged']:7d}  "
                         f"{'' if rate is None else f'{rate:6.1%}'}  {_bar(rate)}")
        h = m["scores"]
        if h is not None:
            lines.append(f"  scores now ({h['n_now']} most recent) vs calibration ({h['n_calibration']}):")
            if "ks_distance" in h:
                lines.append(f"    median {h['median_now']:.4g} vs {h['median_calibration']:.4g}; "
                             f"Kolmogorov-Smirnov distance {h['ks_distance']:.3f}")
            now_total = max(1, h["n_now"])
            cal_total = max(1, h["n_calibration"])
            for i, count in enumerate(h["now"]):
                cal = h["calibration"][i] if h["calibration"] else 0
                lines.append(f"    [{h['edges'][i]:>10.4g}, {h['edges'][i + 1]:>10.4g})  "
                             f"now {_bar(count / now_total, 15)}  cal {_bar(cal / cal_total, 15)}")
        lines.append("  most recent flagged images:")
        if not m["recent_flagged"]:
            lines.append("    (none)")
        for r in m["recent_flagged"]:
            lines.append(f"    #{r['id']}  {_when(r['time'])}  {r['item']}  score {r['score']:.4g}  "
                         f"p {r['p_value']:.4g}  request {r['request_id']}")
        lines.append("  alarm history:")
        if not m["alarm_history"]:
            lines.append("    (none)")
        for e in m["alarm_history"]:
            lm = e["log10_martingale"]
            lines.append(f"    {_when(e['time'])}  {e['event']:<8} epoch {e['epoch']}  "
                         f"{'' if lm is None else f'log10 M = {lm:.3f}'}  n = {e['n_observed']}"
                         + (f"  {json.dumps(e['detail'], default=str)}" if e["detail"] else ""))
    return "\n".join(lines)


__all__ = ["render_text", "summarize"]
