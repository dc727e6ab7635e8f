"""Report polish: one colour per detector across every figure, the heat map's colour bar in the cells'
unit, no average column that repeats a single set, legends off the data, degenerate histograms named.

The benchmark output is written by hand here (results.json + scores/), so the tests need no network,
no torch model and control the scores exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from oodscope.evaluation.metrics import ood_metrics
from oodscope.reports import plots, render_report

pytest.importorskip("matplotlib")

METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "detection_error")


def write_results(out: Path, scores: dict[str, dict[str, np.ndarray]], kinds: dict[str, str | None],
                  backbone: str = "bb") -> Path:
    """A results directory like ``run_benchmark``'s: ``scores[detector] = {"id": ..., set: ...}``;
    near / far averages for every non-empty group and the all-average over two sets or more, as
    ``evaluation.bench`` writes them."""
    from safetensors.numpy import save_file

    rows, files = [], {}
    for det, sc in scores.items():
        rel = f"scores/{backbone}/{det}.safetensors"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in sc.items()}, str(out / rel))
        files[det] = rel
        common = {"backbone": backbone, "detector": det, "id_accuracy": None, "id_accuracy_source": "",
                  "fit_s": 0.1, "score_s": 0.2, "note": ""}
        per_set = []
        for name, kind in kinds.items():
            m = ood_metrics(sc["id"], sc[name])
            row = {**common, "set": name, "kind": kind or "", **{k: float(m[k]) for k in METRICS},
                   "n_id": m["n_id"], "n_ood": m["n_ood"]}
            rows.append(row)
            per_set.append(row)
        for label, members in (("near", [r for r in per_set if r["kind"] == "near"]),
                               ("far", [r for r in per_set if r["kind"] == "far"]), ("all", per_set)):
            if not members or (label == "all" and len(members) < 2):
                continue
            rows.append({**common, "set": f"{label}-average", "kind": "average",
                         **{k: float(np.mean([r[k] for r in members])) for k in METRICS},
                         "n_id": members[0]["n_id"], "n_ood": sum(r["n_ood"] for r in members)})
    first = next(iter(scores.values()))
    datasets = {"id": {"role": "id", "kind": None, "data": "synthetic", "images": len(first["id"]), "n_failed": 0}}
    datasets |= {name: {"role": "ood", "kind": kind, "data": "synthetic", "images": len(first[name]), "n_failed": 0}
                 for name, kind in kinds.items()}
    payload = {"environment": {"date": "2024-01-01", "oodscope": "test", "python": "3", "torch": "-", "cpu_count": 1},
               "datasets": datasets, "results": rows, "scores": {backbone: files}, "failures": [], "timings": [],
               "config": {}}
    (out / "results.json").write_text(json.dumps(payload))
    return out


def crossing_scores(n: int = 60, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Detectors whose rank differs per set (a best on near_1, b on far_1, c on far_2), and one whose
    scores are all equal."""
    rng = np.random.default_rng(seed)
    id_ = rng.normal(0, 1, n)
    shifts = {"a": (3.0, 0.3, 1.0), "b": (0.3, 3.0, 0.6), "c": (1.0, 0.6, 3.0), "d": (1.5, 1.5, 1.5)}
    out = {}
    for det, (s1, s2, s3) in shifts.items():
        noise = rng.normal(0, 1, (4, n))
        out[det] = {"id": id_ + 0.1 * noise[0], "near_1": s1 + noise[1], "far_1": s2 + noise[2],
                    "far_2": s3 + noise[3]}
    out["flat"] = {k: np.full(n, 0.25) for k in ("id", "near_1", "far_1", "far_2")}
    return out


KINDS = {"near_1": "near", "far_1": "far", "far_2": "far"}


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure the report functions turn into a PNG, in order."""
    captured = []
    real = plots._png

    def keep(fig):
        captured.append(fig)
        return real(fig)

    monkeypatch.setattr(plots, "_png", keep)
    return captured


def colour_of(artist) -> str:
    """The colour an artist draws its detector in (line, outline, or the border of a note's box)."""
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D
    from matplotlib.text import Text

    if isinstance(artist, Line2D):
        return to_hex(artist.get_color())
    if isinstance(artist, Text):
        return to_hex(artist.get_bbox_patch().get_edgecolor())
    return to_hex(artist.get_edgecolor())


def detector_artists(fig) -> dict[str, set[str]]:
    """``{detector: colours it is drawn in}`` over the figure's artists tagged ``detector=<name>``."""
    found: dict[str, set[str]] = {}
    for artist in fig.findobj(lambda a: "detector=" in (a.get_gid() or "")):
        tags = dict(part.split("=", 1) for part in artist.get_gid().split(";"))
        found.setdefault(tags["detector"], set()).add(colour_of(artist))
    return found


def table_swatches(html: str) -> dict[str, str]:
    return {name: colour.lower() for colour, name in
            re.findall(r'<span class="sw" style="background:(#[0-9a-fA-F]{6})"></span>([^<]+)<', html)}


# ------------------------------------------------------------------------------------ 1. one colour per detector
def test_every_figure_draws_a_detector_in_the_same_colour(tmp_path, figures):
    scores = crossing_scores()
    out = render_report(write_results(tmp_path, scores, KINDS), tmp_path / "r.html")
    # The detectors are ranked differently on each set, so a colour given by rank would move.
    ranks = {s: sorted(scores, key=lambda d, s=s: -ood_metrics(scores[d]["id"], scores[d][s])["auroc"]) for s in KINDS}
    assert len({tuple(r) for r in ranks.values()}) > 1
    seen: dict[str, set[str]] = {}
    panels: dict[str, int] = {}
    for fig in figures:
        for det, colours in detector_artists(fig).items():
            seen.setdefault(det, set()).update(colours)
            panels[det] = panels.get(det, 0) + 1
    assert set(seen) == set(scores)
    # Heat map + one ROC plot per set + the detector's histogram panel.
    assert all(n == 1 + len(KINDS) + 1 for n in panels.values()), panels
    assert all(len(c) == 1 for c in seen.values()), seen
    colour = {det: next(iter(c)) for det, c in seen.items()}
    assert len(set(colour.values())) == len(colour)  # five detectors, five colours
    # The results table shows the same colour before each name.
    assert table_swatches(out.read_text()) == colour


def test_plot_functions_take_the_mapping():
    rng = np.random.default_rng(1)
    from matplotlib.colors import to_hex

    colours = {d: to_hex(c) for d, c in plots.detector_colours(["x", "y", "z"]).items()}
    assert len(set(colours.values())) == 3
    curves = {d: (rng.normal(0, 1, 30), rng.normal(k, 1, 30)) for k, d in enumerate(["z", "x"])}
    drawn = detector_artists(plots.roc_figure(curves, "t", colours=colours))
    assert drawn == {d: {colours[d]} for d in curves}
    hist = plots.histogram_figure(rng.normal(0, 1, 30), {"s1": rng.normal(1, 1, 30), "s2": rng.normal(2, 1, 30)},
                                  "y", colour=colours["y"], detector="y")
    assert detector_artists(hist) == {"y": {colours["y"]}}
    heat = plots.heatmap_figure(np.array([[0.7], [0.9]]), ["z", "y"], ["s1"], "t", colours=colours)
    assert detector_artists(heat) == {"z": {colours["z"]}, "y": {colours["y"]}}
    # A name the mapping lacks gets a colour no mapped detector has.
    extra = detector_artists(plots.roc_figure({"x": curves["x"], "new": curves["z"]}, "t", colours={"x": colours["x"]}))
    assert extra["new"] != extra["x"]


# ------------------------------------------------------------------------------------ 2. colour bar in the cells' unit
def cell_numbers(ax) -> dict[tuple[int, int], float]:
    return {(round(t.get_position()[1]), round(t.get_position()[0])): float(t.get_text()) for t in ax.texts}


def test_heat_map_colour_bar_is_in_the_unit_of_its_cells():
    values = np.array([[0.62, 0.971], [0.45, np.nan], [0.8, 1.0]])
    vmin, vmax = 0.5, 1.0
    fig = plots.heatmap_figure(values, ["a", "b", "c"], ["s1", "s2"], "t", vmin=vmin, vmax=vmax)
    ax, bar = fig.axes
    image = ax.images[0]
    numbers = cell_numbers(ax)
    assert len(numbers) == np.isfinite(values).sum()
    for (i, j), written in numbers.items():
        # The value mapped to a colour is the number written in the cell (to its one decimal).
        assert float(image.get_array()[i, j]) == pytest.approx(written, abs=0.05)
        assert written == pytest.approx(100 * values[i, j], abs=0.05)
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((100 * vmin, 100 * vmax))
    assert sorted(bar.get_ylim()) == pytest.approx([100 * vmin, 100 * vmax])
    assert "%" in bar.get_ylabel() and "AUROC" in bar.get_ylabel()


def test_report_heat_map_bar_matches_its_cells(tmp_path, figures):
    results = write_results(tmp_path, crossing_scores(), KINDS)
    render_report(results, tmp_path / "r.html")
    heat = next(f for f in figures if f.axes[0].images)
    ax, bar = heat.axes
    image = ax.images[0]
    numbers = cell_numbers(ax)
    detectors = [t.get_text() for t in ax.get_yticklabels()]
    columns = [t.get_text() for t in ax.get_xticklabels()]
    rows = json.loads((results / "results.json").read_text())["results"]
    auroc = {(r["detector"], r["set"]): r["auroc"] for r in rows}
    assert len(numbers) == len(detectors) * len(columns)
    for (i, j), written in numbers.items():
        assert written == pytest.approx(100 * auroc[(detectors[i], columns[j])], abs=0.05)  # cells in %
        assert float(image.get_array()[i, j]) == pytest.approx(written, abs=0.05)  # colours from the same number
    # The bar's axis is the colour scale of those numbers, labelled in %.
    assert sorted(bar.get_ylim()) == pytest.approx([image.norm.vmin, image.norm.vmax])
    assert image.norm.vmin < max(numbers.values()) <= image.norm.vmax
    assert "%" in bar.get_ylabel()


# ------------------------------------------------------------------------------------ 3. no one-set averages
def results_headers(html: str) -> list[str]:
    return re.findall(r'<th colspan="2">([^<]+)</th>', html)


@pytest.mark.parametrize(("kinds", "averages"), [
    (KINDS, ["far-average", "all-average"]),  # one near set: no near average
    ({"near_1": "near", "far_1": "far"}, ["all-average"]),  # one of each: only the all-average
    ({"near_1": "near", "far_2": "near"}, ["all-average"]),  # near average = all-average: shown once
    ({"near_1": "near"}, []),  # a single set: no average at all
    ({"near_1": None, "far_1": None}, ["all-average"]),  # untagged sets
])
def test_no_average_column_repeats_a_single_set(tmp_path, figures, kinds, averages):
    scores = {d: {k: v for k, v in sc.items() if k == "id" or k in kinds} for d, sc in crossing_scores().items()}
    results = write_results(tmp_path, scores, kinds)
    rows = json.loads((results / "results.json").read_text())["results"]
    written = {r["set"] for r in rows if r["kind"] == "average"}
    html = render_report(results, tmp_path / "r.html").read_text()
    assert results_headers(html) == list(kinds) + [a.replace("-average", " avg") for a in averages]
    heat = next(f for f in figures if f.axes[0].images)
    assert [t.get_text() for t in heat.axes[0].get_xticklabels()] == list(kinds) + averages
    # The benchmark did write the averages left out (the report is what filters them).
    if any(kind == "near" for kind in kinds.values()):
        assert "near-average" in written and "near-average" not in averages


# ------------------------------------------------------------------------------------ 4. legends off the data
def overlap(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def legends_on_axes(fig) -> tuple[int, list[tuple[str, float]]]:
    fig.canvas.draw()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    hits = [(ax.get_title(), overlap(legend.get_window_extent(), ax.get_window_extent()))
            for legend in legends for ax in fig.axes]
    return len(legends), [h for h in hits if h[1] > 0.5]


def test_legends_do_not_cover_the_axes(tmp_path, figures):
    render_report(write_results(tmp_path, crossing_scores(), KINDS), tmp_path / "r.html")
    counted = 0
    for fig in figures:
        n, hits = legends_on_axes(fig)
        counted += n
        assert not hits, hits
    assert counted >= len(KINDS) + 4  # every ROC plot and every non-degenerate histogram has one


def test_a_long_legend_stays_below_the_roc_axes():
    rng = np.random.default_rng(2)
    curves = {f"detector_with_a_long_name_{k}": (rng.normal(0, 1, 40), rng.normal(k / 4, 1, 40)) for k in range(8)}
    n, hits = legends_on_axes(plots.roc_figure(curves, "many"))
    assert n == 1 and not hits
    n, hits = legends_on_axes(plots.histogram_figure(rng.normal(0, 1, 40), {f"set_{k}": rng.normal(k, 1, 40)
                                                                            for k in range(6)}, "many sets"))
    assert n == 1 and not hits


# ------------------------------------------------------------------------------------ 5. degenerate histograms
def test_all_equal_scores_are_named_not_drawn(tmp_path, figures):
    scores = crossing_scores()
    render_report(write_results(tmp_path, scores, KINDS), tmp_path / "r.html")
    flat = next(f for f in figures if f.axes[0].get_title() == "flat")
    n = sum(len(v) for v in scores["flat"].values())
    value = float(scores["flat"]["id"][0])
    notes = [t.get_text() for t in flat.axes[0].texts]
    assert any(f"all {n} scores equal {value:.4g}" in t for t in notes), notes
    assert not flat.axes[0].patches  # no bars, no outlines
    # The other histograms are drawn and carry no such note.
    others = [f for f in figures if f.axes and f.axes[0].get_title() in set(scores) - {"flat"}]
    assert len(others) == len(scores) - 1
    assert all(f.axes[0].patches and not any("equal" in t.get_text() for t in f.axes[0].texts) for f in others)


def test_a_set_with_zero_spread_gets_a_note_not_a_spike():
    rng = np.random.default_rng(3)
    ood = {"spread": rng.normal(2, 1, 50), "stuck": np.full(20, 1.5)}
    fig = plots.histogram_figure(rng.normal(0, 1, 50), ood, "t", detector="d")
    ax = fig.axes[0]
    drawn_sets = {dict(p.split("=") for p in a.get_gid().split(";"))["set"]
                  for a in ax.patches if a.get_gid()}
    assert drawn_sets == {"spread"}  # the constant set has no histogram outline
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "stuck: all 20 scores equal 1.5" in labels and "spread" in labels and "ID" in labels
    # The densities stay on the scale of the spread sets (a one-bin spike would be 1 / bin width tall).
    width = ax.patches[0].get_width()  # an ID bar
    assert ax.get_ylim()[1] < 0.5 / width
