"""The README's main job, end to end at a small size."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from oodscope.backbones import DEFAULT_ZERO_SHOT_BACKBONE
from oodscope.cli.main import main


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("conformal_clip_data")
    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--per-class", "6", "--far", "20"]) == 0
    printed, errors = capsys.readouterr()
    # 36 fit images, 1,280-d: the fit caution is one line on stderr, without a Python warning's source line
    assert "oodscope demo: caution: mahalanobis: fitted on 36 images" in errors
    assert "FitWarning" not in errors
    assert "`mahalanobis`: fitted on 36 images of 1280-d features" in printed  # the caution is in the table
    for detector in ("msp", "energy", "vim", "knn", "mahalanobis", "mcm", "label_vocabulary", "gda", "linear_probe"):
        assert f"\n| {detector} | " in printed  # a result row, not a "not run" row
    assert "## Not run" not in printed
    assert "unreadable: id/corrupt.png" in printed
    assert "Report:" in printed
    deployment = (out / "deployment.json").read_text()
    assert '"id"' in deployment and '"textiles"' in deployment
    report = (out / "report.html").read_text()
    HTMLParser().feed(report)  # parses
    # One report: both backbones' results, then the deployment with the corrupt file named.
    assert (report.index(">effnet-lite0</h3>") < report.index(f">{DEFAULT_ZERO_SHOT_BACKBONE}</h3>")
            < report.index("<h2 id='extra-0'>Deployment"))
    assert "unreadable: id/corrupt.png" in report and "data:image/png;base64," in report
    assert (out / "model").is_dir()
