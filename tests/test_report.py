"""HTML report: parses, every image is an embedded PNG, no external resources, audit results included,
ROC curves agree with the metrics."""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from test_bench import FakeVLM, config, make_data
from tiny_models import tiny_classifier

from oodscope.evaluation.bench import run_benchmark
from oodscope.evaluation.metrics import auroc
from oodscope.reports import plots, render_report, write_audit_report

pytest.importorskip("matplotlib")


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br", "input"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"unbalanced </{tag}> after {self.open[-3:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> _Collect:
    p = _Collect()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert not p.open, f"unclosed tags {p.open}"
    return p


def check_self_contained(p: _Collect) -> list[bytes]:
    pngs = []
    for tag, attrs in p.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href", "srcset", "data", "action"):
            value = attrs.get(key) or ""
            assert not value.lower().startswith(("http://", "https://", "//")), (tag, key, value)
        if tag == "img":
            src = attrs["src"]
            assert src.startswith("data:image/png;base64,"), src[:40]
            raw = base64.b64decode(src.split(",", 1)[1], validate=True)
            assert raw[:8] == b"\x89PNG\r\n\x1a\n"
            Image.open(io.BytesIO(raw)).verify()
            pngs.append(raw)
        if tag == "a":
            assert (attrs.get("href") or "").startswith("#")
    return pngs


def _audit_dir(path):
    path.mkdir()
    doc = {"format": "oodscope-audit", "format_version": 1, "audits": {"prompt_sensitivity": {
        "kind": "prompt_sensitivity", "method": "mcm", "backbone_id": "fake-vlm", "n_id": 30,
        "n_ood": {"near_a": 20}, "classes": ["ant", "bee"], "seconds": 1.5}}}
    (path / "audit.json").write_text(json.dumps(doc))
    with open(path / "prompt_summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ood_set", "auroc_min", "auroc_max", "best_label"])
        w.writerow(["near_a", "0.61", "0.74", "paraphrase: a picture of a {}."])
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path / "prompt_sensitivity.png")
    plt.close(fig)
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    data = {"id": make_data(24, 0, 140, True, "id", 1), "id_fit": make_data(30, 0, 140, True, "fit", 2),
            "near_a": make_data(16, 60, 220, False, "near", 3), "far_b": make_data(18, 140, 256, False, "far", 4)}
    cfg = config(data, [FakeVLM(tiny_classifier(1))], ["msp", "knn", "mcm"], out,
                 detector_params={"knn": {"k": 3}})
    run_benchmark(cfg)
    render_report(out, out / "report.html")  # the runner writes results; the layer above renders them
    return out


def test_bench_writes_a_self_contained_report(results):
    html_path = results / "report.html"
    assert html_path.is_file()
    p = parse(html_path)
    pngs = check_self_contained(p)
    # One AUROC heat map, one ROC plot per OOD set, one histogram per detector that ran (knn, mcm;
    # msp needs logits, which this backbone lacks).
    assert len(pngs) == 1 + 2 + 2
    text = " ".join(p.text)
    for needle in ("fake-vlm", "near_a", "far_b", "AUROC", "Not run", "python", "Configuration"):
        assert needle in text, needle


def test_report_includes_an_audit_directory(results, tmp_path):
    audit = _audit_dir(tmp_path / "audit")
    out = render_report(results, tmp_path / "with_audit.html", audit_dirs=[audit], title="T", max_histograms=0)
    p = parse(out)
    pngs = check_self_contained(p)
    assert len(pngs) == 1 + 2 + 0 + 1
    text = " ".join(p.text)
    assert "prompt sensitivity" in text and "paraphrase: a picture of a {}." in text and "0.7400" in text
    only = write_audit_report(audit)  # the hook `oodscope audit` calls
    assert only == audit / "report.html"
    assert len(check_self_contained(parse(only))) == 1


def test_without_matplotlib_the_report_keeps_the_tables(results, tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    p = parse(render_report(results, tmp_path / "plain.html"))
    assert "knn" in " ".join(p.text)
    assert not check_self_contained(p)
    assert "matplotlib" in " ".join(p.text)


def test_report_cli(results, tmp_path, capsys):
    from oodscope.cli.main import main

    assert main(["report", str(results), "-o", str(tmp_path / "cli.html"), "--max-histograms", "1"]) == 0
    assert len(check_self_contained(parse(tmp_path / "cli.html"))) == 1 + 2 + 1
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_roc_curve_area_is_the_auroc_with_ties():
    rng = np.random.default_rng(0)
    s_id = rng.integers(0, 6, 40).astype(float)  # many ties
    s_ood = rng.integers(2, 9, 30).astype(float)
    fpr, tpr = plots.roc_curve(s_id, s_ood)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(s_id, s_ood), abs=1e-12)
    # Hand-checkable: ID {0, 1}, OOD {1, 2}: flagged at t=2 -> (0, .5); t=1 -> (.5, 1); t=0 -> (1, 1).
    fpr, tpr = plots.roc_curve(np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]


def test_two_backbones_rows_ranked_repeats_folded_and_extra_sections(tmp_path):
    from test_bench import Counting

    from oodscope.reports.markup import html_table

    data = {"id": make_data(24, 0, 140, True, "id", 1), "id_fit": make_data(30, 0, 140, True, "fit", 2),
            "near_a": make_data(16, 60, 220, False, "near", 3), "far_b": make_data(18, 140, 256, False, "far", 4)}
    copy = Counting(tiny_classifier(0))
    copy.id = "tiny-copy"  # same network under another name: every row repeats the first backbone's
    result = run_benchmark(config(data, [tiny_classifier(0), copy], ["msp", "energy", "mahalanobis"], tmp_path))
    out = render_report(tmp_path, tmp_path / "r.html",
                        sections=[("Extra <part>", html_table(["a", "b"], [("<x>", 1)]))])
    p = parse(out)
    pngs = check_self_contained(p)
    assert len(pngs) == 1 + 2 + 3  # figures for the first backbone only
    html = out.read_text()
    assert "Same metrics on every set as on tiny-cnn-0 (not repeated): " in html
    assert "figures-tiny_copy" not in html and "Extra &lt;part&gt;" in html and "&lt;x&gt;" in html
    mean = {r["detector"]: r["auroc"] for r in result.rows
            if r["backbone"] == "tiny-cnn-0" and r["set"] == "all-average"}
    first_table = html[html.index("results-tiny_cnn_0"):html.index("results-tiny_copy")]
    positions = {d: first_table.index(f">{d}<") for d in mean}
    assert sorted(mean, key=lambda d: positions[d]) == sorted(mean, key=lambda d: -mean[d])
