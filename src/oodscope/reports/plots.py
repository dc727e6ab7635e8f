"""Figures for reports, returned as PNG bytes (matplotlib with the Agg backend, imported lazily).

matplotlib is the optional extra ``plots`` (``pip install 'oodscope[plots]'``); :func:`available`
says whether it imports. Curves are computed here with NumPy so that they match
:mod:`oodscope.evaluation.metrics` exactly (OOD is the positive class, higher score = more OOD).

One report, one colour per detector: :func:`detector_colours` builds the mapping once and every
figure function takes it (``colours=``), so a detector looks the same in the heat map, the ROC curves
and its histograms. OOD sets are told apart by line style (:func:`set_styles`), not by colour, so
that colour always means detector. Legends sit outside the axes (below them), never on the data.
Each ``*_png`` function has a ``*_figure`` twin that returns the matplotlib figure instead, whose
detector artists carry ``gid="detector=<name>"`` (and ``;set=<name>`` where a set is drawn).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["PALETTE", "available", "detector_colours", "heatmap_figure", "heatmap_png", "histogram_figure",
           "histogram_png", "roc_curve", "roc_figure", "roc_png", "set_styles"]

# Colour-blind-safe palette (Okabe & Ito) followed by matplotlib's tab10 for long lists.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000",
           "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
# Line styles for OOD sets (solid, dashed, dotted, dash-dot, then denser dash patterns).
LINE_STYLES = ("-", "--", ":", "-.", (0, (6, 1.5, 1, 1.5, 1, 1.5)), (0, (1, 0.8)), (0, (9, 2.5)), (0, (3, 1, 3, 3)))
_ID_COLOUR = "#999999"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("report figures need matplotlib: pip install 'oodscope[plots]'") from err
    matplotlib.use("Agg", force=True)  # no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


# ============================================================================ one colour per detector
def detector_colours(names: Iterable[str], *, palette: Sequence[str] = PALETTE) -> dict[str, str]:
    """``{name: colour}`` for the distinct names in first-seen order (the palette repeats past its end)."""
    return {name: palette[k % len(palette)] for k, name in enumerate(dict.fromkeys(names))}


def set_styles(names: Iterable[str]) -> dict[str, object]:
    """``{set: line style}`` for the distinct set names in first-seen order (styles repeat past 8)."""
    return {name: LINE_STYLES[k % len(LINE_STYLES)] for k, name in enumerate(dict.fromkeys(names))}


def _complete(mapping: Mapping[str, object] | None, names: Iterable[str], make) -> dict[str, object]:
    """``mapping`` for the names it has; the others get fresh entries from ``make``, unused values first."""
    names = list(dict.fromkeys(names))
    out = {n: mapping[n] for n in names if mapping and n in mapping}
    missing = [n for n in names if n not in out]
    if missing:
        used = {str(v).lower() for v in (*(mapping or {}).values(), *out.values())}
        pool = make(range(len(used) + len(missing)))
        fresh = [v for v in pool.values() if str(v).lower() not in used] or list(pool.values())
        out.update({n: fresh[k % len(fresh)] for k, n in enumerate(missing)})
    return out


def _gid(detector: str | None = None, set_name: str | None = None) -> str:
    return ";".join(f"{k}={v}" for k, v in (("detector", detector), ("set", set_name)) if v is not None)


def _legend_below(fig, ax, *, title: str | None = None, ncols: int = 2):
    """The axes' legend in its own row under the axes (constrained layout keeps it off the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return fig.legend(handles, labels, loc="outside lower center", ncols=max(1, min(ncols, len(handles))),
                      fontsize=7, title=title, title_fontsize=7, frameon=False, handlelength=2.6)


def _legend_rows(n: int, ncols: int) -> int:
    return -(-n // max(1, min(ncols, n))) if n else 0


# ============================================================================ ROC
def roc_curve(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1).

    Flagging ``score >= t`` as OOD: TPR = share of OOD flagged, FPR = share of ID flagged. The area
    under it (trapezoids) equals :func:`oodscope.evaluation.metrics.auroc`, ties included.
    """
    s_id = np.asarray(id_scores, dtype=np.float64)
    s_ood = np.asarray(ood_scores, dtype=np.float64)
    values, inverse = np.unique(np.concatenate([s_id, s_ood]), return_inverse=True)
    c_id = np.bincount(inverse[: s_id.size], minlength=values.size)[::-1]
    c_ood = np.bincount(inverse[s_id.size:], minlength=values.size)[::-1]
    fpr = np.concatenate([[0.0], np.cumsum(c_id) / max(s_id.size, 1)])
    tpr = np.concatenate([[0.0], np.cumsum(c_ood) / max(s_ood.size, 1)])
    return fpr, tpr


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, *,
               size: tuple[float, float] = (5.2, 4.4), dpi: int = 90, colours: Mapping[str, str] | None = None):
    """The figure of :func:`roc_png`."""
    plt = _pyplot()
    colours = _complete(colours, curves, detector_colours)
    ncols = 2
    fig = plt.figure(figsize=(size[0], size[1] + 0.3 + 0.15 * _legend_rows(len(curves), ncols)), dpi=dpi,
                     layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1, ls="--", zorder=0)
    for label, (s_id, s_ood) in curves.items():
        fpr, tpr = roc_curve(s_id, s_ood)
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids
        ax.plot(fpr, tpr, lw=1.6, color=colours[label], label=f"{label} ({100 * area:.1f})", gid=_gid(label))
    # A small margin keeps curves that run along the axes (perfect separation) visible.
    ax.set_xlim(-0.01, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("ID flagged as OOD (FPR)")
    ax.set_ylabel("OOD flagged as OOD (TPR)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, title="detector (AUROC %)", ncols=ncols)
    return fig


def roc_png(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, *, size: tuple[float, float] = (5.2, 4.4),
            dpi: int = 90, colours: Mapping[str, str] | None = None) -> bytes:
    """ROC curves, one per label: ``curves[label] = (id_scores, ood_scores)``; AUROC in the legend.

    ``colours``: ``{label: colour}`` (the report's :func:`detector_colours`); labels it lacks get unused colours.
    """
    return _png(roc_figure(curves, title, size=size, dpi=dpi, colours=colours))


# ============================================================================ histograms
def _fmt(x: float) -> str:
    return f"{x:.4g}"


def histogram_figure(id_scores: np.ndarray, ood: Mapping[str, np.ndarray], title: str, *, bins: int = 50,
                     size: tuple[float, float] = (5.2, 3.0), dpi: int = 90, colour: str | None = None,
                     styles: Mapping[str, object] | None = None, detector: str | None = None):
    """The figure of :func:`histogram_png`."""
    plt = _pyplot()
    colour = colour or PALETTE[0]
    styles = _complete(styles, ood, set_styles)
    groups = {"ID": np.asarray(id_scores, np.float64).ravel(),
              **{name: np.asarray(v, np.float64).ravel() for name, v in ood.items()}}
    finite = {name: v[np.isfinite(v)] for name, v in groups.items()}
    everything = np.concatenate(list(finite.values()))
    ncols = 4
    fig = plt.figure(figsize=(size[0], size[1] + 0.15 * _legend_rows(len(groups), ncols)), dpi=dpi,
                     layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    if everything.size == 0 or everything.min() == everything.max():
        # Nothing to bin: say so instead of drawing one spike.
        if everything.size == 0:
            note = "no finite scores"
        else:
            counts = ", ".join(f"{name} {v.size}" for name, v in finite.items() if v.size)
            note = f"all {everything.size} scores equal {_fmt(everything[0])}\n({counts})"
        # The box's border carries the detector's colour, as the outlines do in the other panels.
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="#333333",
                bbox={"boxstyle": "round,pad=0.6", "facecolor": "white", "edgecolor": colour, "linewidth": 2},
                gid=_gid(detector, "all"))
        ax.set_xlabel("score (higher = more OOD)")
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    # The central 98 % of the pooled scores: heavy tails (NegLabel, Mahalanobis) would otherwise
    # squeeze every distribution into one bin.
    lo, hi = np.percentile(everything, [1, 99])
    if hi <= lo:
        lo, hi = float(everything.min()), float(everything.max())
    edges = np.linspace(lo, hi, bins + 1)
    at_bottom = ax.get_xaxis_transform()  # x in data, y in axes units
    for name, values in finite.items():
        is_id = name == "ID"
        line = {"color": _ID_COLOUR if is_id else colour, "gid": None if is_id else _gid(detector, name)}
        if values.size and values.min() == values.max():
            # Zero spread: a marker on the axis and the value in the legend, not a spike of height 1 / bin width.
            ax.plot([min(max(values[0], lo), hi)], [0.0], transform=at_bottom, clip_on=False, ls="none",
                    marker="^", ms=8, mec="white", mew=0.6, color=line["color"], gid=line["gid"],
                    label=f"{name}: all {values.size} scores equal {_fmt(values[0])}", zorder=5)
        elif values.size and is_id:
            ax.hist(np.clip(values, lo, hi), bins=edges, density=True, color=_ID_COLOUR, alpha=0.55, label="ID")
        elif values.size:
            ax.hist(np.clip(values, lo, hi), bins=edges, density=True, histtype="step", lw=1.6,
                    ls=styles[name], label=name, **line)
    ax.set_xlim(lo - 0.01 * (hi - lo), hi + 0.01 * (hi - lo))
    ax.set_xlabel("score (higher = more OOD; central 98 % shown)")
    ax.xaxis.set_major_locator(_locator(5))
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax, ncols=ncols)
    return fig


def histogram_png(id_scores: np.ndarray, ood: Mapping[str, np.ndarray], title: str, *, bins: int = 50,
                  size: tuple[float, float] = (5.2, 3.0), dpi: int = 90, colour: str | None = None,
                  styles: Mapping[str, object] | None = None, detector: str | None = None) -> bytes:
    """Score densities of one detector: ID filled in grey, each OOD set an outline in the detector's
    ``colour`` with its own line style (``styles``: the report's :func:`set_styles`), shared bins.

    A set whose scores are all equal gets a marker on the axis and "all N scores equal X" in the
    legend; when every score is equal the panel says so instead of drawing a histogram.
    """
    return _png(histogram_figure(id_scores, ood, title, bins=bins, size=size, dpi=dpi, colour=colour,
                                 styles=styles, detector=detector))


def _locator(n: int):
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(n)


# ============================================================================ heat map
def heatmap_figure(values: np.ndarray, rows: Sequence[str], columns: Sequence[str], title: str, *,
                   vmin: float = 0.5, vmax: float = 1.0, dpi: int = 90, colours: Mapping[str, str] | None = None,
                   label: str = "AUROC"):
    """The figure of :func:`heatmap_png`."""
    plt = _pyplot()
    from matplotlib.transforms import ScaledTranslation

    values = np.asarray(values, dtype=np.float64)
    shown = 100 * values  # the unit of the cells, of the colours and of the colour bar: %
    lo, hi = 100 * vmin, 100 * vmax
    colours = _complete(colours, rows, detector_colours)
    fig, ax = plt.subplots(figsize=(1.6 + 0.95 * len(columns), 0.8 + 0.28 * len(rows)), dpi=dpi)
    image = ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=30, ha="right", fontsize=8)
    # Each row's detector colour as a square between its name and the grid.
    ax.set_yticks(range(len(rows)), labels=list(rows), fontsize=8)
    ax.tick_params(axis="y", length=0, pad=13)
    swatch = ax.get_yaxis_transform() + ScaledTranslation(-7 / 72, 0, fig.dpi_scale_trans)
    for i, row in enumerate(rows):
        ax.plot([0.0], [i], transform=swatch, clip_on=False, ls="none", marker="s", ms=7, color=colours[row],
                mec="#555555", mew=0.4, gid=_gid(row))
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            if np.isfinite(shown[i, j]):
                bright = (min(max(shown[i, j], lo), hi) - lo) / (hi - lo) > 0.6
                ax.text(j, i, f"{shown[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if bright else "white")
    ax.set_title(title, fontsize=10)
    below = bool(np.isfinite(shown).any() and np.nanmin(shown) < lo)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, extend="min" if below else "neither")
    bar.set_label(f"{label} (%)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def heatmap_png(values: np.ndarray, rows: Sequence[str], columns: Sequence[str], title: str, *,
                vmin: float = 0.5, vmax: float = 1.0, dpi: int = 90, colours: Mapping[str, str] | None = None,
                label: str = "AUROC") -> bytes:
    """Detector x set table of AUROC values (fractions, as are ``vmin`` / ``vmax``) as a colour grid.

    Cells, colours and colour bar are all in % (the bar is labelled "AUROC (%)"); each row's detector
    colour (``colours``) is a square next to its name.
    """
    return _png(heatmap_figure(values, rows, columns, title, vmin=vmin, vmax=vmax, dpi=dpi, colours=colours,
                               label=label))
