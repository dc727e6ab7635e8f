"""Hyper-parameter search: picks the truly best grid value, fits only on id_fit, reports every row."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from oodscope.backbones.base import ClassifierParts, Features, InputSpec
from oodscope.detectors import Detector, DetectorError, create, registered
from oodscope.detectors import base as detector_base
from oodscope.detectors.kinds import DetectorKind
from oodscope.evaluation.tune import DEFAULT_GRIDS, GRID_SOURCES, METRICS, default_grid, tune, tune_model_based


# --------------------------------------------------------------------- independent metric references
def ref_auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """P(ood > id) + 0.5 P(ood == id), by comparing every pair."""
    diff = ood_scores[:, None] - id_scores[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def ref_fpr95(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """OOD accepted (score <= t) at the smallest t accepting >= 95 % of ID."""
    t = np.sort(id_scores)[math.ceil(0.95 * len(id_scores) - 1e-9) - 1]
    return float((ood_scores <= t).mean())


# --------------------------------------------------------------------- a probe detector
class Probe(Detector):
    """Score = embedding[:, column] - (mean of that column on the fitted data); logs what it sees."""

    name = "tune_probe"
    kind = DetectorKind.FEATURE
    requires = ("embedding",)
    needs_fit = True
    seen: list[tuple[str, float]] = []

    def __init__(self, column: int = 0) -> None:
        super().__init__()
        if column < 0:
            raise DetectorError("tune_probe: column must be >= 0")
        self.column = column

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        x = inputs["embedding"]
        if self.column >= x.shape[1]:
            raise DetectorError(f"tune_probe: no column {self.column}")
        Probe.seen.append(("fit", float(x.sum())))
        self.state_["center"] = x[:, self.column].mean().reshape(1)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["embedding"]
        Probe.seen.append(("score", float(x.sum())))
        return x[:, self.column] - self._state("center", x)[0]


@pytest.fixture
def probe():
    detector_base.register(Probe)
    Probe.seen.clear()
    yield Probe
    # keep the global registry clean for other test modules
    del detector_base._REGISTRY[Probe.name]


def make_split(rng: np.random.Generator, n: int, ood: bool) -> Features:
    """Column 0: weak signal, 1: inverted, 2: best AUROC (shifted), 3: best FPR@95 (a fifth far below)."""
    cols = [
        rng.normal(0.5 if ood else 0.0, 1.0, n),
        rng.normal(-1.0 if ood else 0.0, 1.0, n),
        rng.normal(1.5 if ood else 0.0, 1.0, n),
    ]
    if ood:  # most OOD far above ID (few accepted at 95 % TPR), a fifth far below (AUROC <= 0.8)
        tail = rng.normal(6.0, 0.5, n)
        tail[: n // 5] = rng.normal(-6.0, 0.5, n // 5)
    else:
        tail = rng.normal(0.0, 1.0, n)
    cols.append(tail)
    return Features(embedding=np.stack(cols, axis=1))


@pytest.fixture
def splits() -> dict[str, Features]:
    rng = np.random.default_rng(0)
    return {
        "id_fit": make_split(rng, 200, ood=False),
        "id_val": make_split(rng, 120, ood=False),
        "ood_val": make_split(rng, 100, ood=True),
        "id_test": make_split(rng, 50, ood=False),
        "ood_test": make_split(rng, 50, ood=True),
    }


def reference_table(splits: dict[str, Features], columns: list[int]) -> list[dict[str, float]]:
    fit = splits["id_fit"].embedding
    out = []
    for c in columns:
        center = fit[:, c].mean()
        s_id, s_ood = splits["id_val"].embedding[:, c] - center, splits["ood_val"].embedding[:, c] - center
        out.append({"auroc": ref_auroc(s_id, s_ood), "fpr95": ref_fpr95(s_id, s_ood)})
    return out


# --------------------------------------------------------------------- selection
def test_picks_the_best_auroc_and_reports_every_row(probe, splits) -> None:
    grid = {"column": [0, 1, 2, 3]}
    result = tune("tune_probe", splits["id_val"], splits["ood_val"], id_fit=splits["id_fit"], grid=grid)
    expected = reference_table(splits, grid["column"])
    assert [row["params"] for row in result.table] == [{"column": c} for c in grid["column"]]
    for row, ref in zip(result.table, expected, strict=True):
        assert row["error"] is None
        assert row["auroc"] == pytest.approx(ref["auroc"], abs=1e-12)
        assert row["fpr95"] == pytest.approx(ref["fpr95"], abs=1e-12)
        assert set(METRICS) <= set(row)
    best = int(np.argmax([r["auroc"] for r in expected]))
    assert result.best_params == {"column": best} and result.metric == "auroc"
    assert result.best_value == pytest.approx(expected[best]["auroc"])
    # the returned detector is the winner, fitted on id_fit
    assert result.detector.column == best and result.detector.is_fitted_
    assert float(result.detector.state_["center"][0]) == pytest.approx(
        splits["id_fit"].embedding[:, best].mean()
    )
    np.testing.assert_allclose(
        result.detector.score(splits["id_val"]),
        splits["id_val"].embedding[:, best] - splits["id_fit"].embedding[:, best].mean(),
        rtol=1e-6,
    )


def test_fpr95_is_minimized(probe, splits) -> None:
    grid = {"column": [0, 2, 3]}
    expected = reference_table(splits, grid["column"])
    by_auroc = grid["column"][int(np.argmax([r["auroc"] for r in expected]))]
    by_fpr = grid["column"][int(np.argmin([r["fpr95"] for r in expected]))]
    assert by_auroc != by_fpr  # the constructed case separates the two criteria
    result = tune(
        "tune_probe", splits["id_val"], splits["ood_val"], id_fit=splits["id_fit"], grid=grid, metric="fpr95"
    )
    assert result.best_params == {"column": by_fpr}
    assert result.best_value == pytest.approx(min(r["fpr95"] for r in expected))
    auroc_result = tune("tune_probe", splits["id_val"], splits["ood_val"], id_fit=splits["id_fit"], grid=grid)
    assert auroc_result.best_params == {"column": by_auroc}


def test_fits_on_id_fit_only_and_never_sees_test_data(probe, splits) -> None:
    tune("tune_probe", splits["id_val"], splits["ood_val"], id_fit=splits["id_fit"], grid={"column": [0, 2]})
    fingerprint = {k: float(np.float32(v.embedding).sum()) for k, v in splits.items()}

    def which(total: float) -> str:
        return next(k for k, v in fingerprint.items() if math.isclose(v, total, rel_tol=1e-5, abs_tol=1e-3))

    fits = [which(s) for kind, s in Probe.seen if kind == "fit"]
    scores = [which(s) for kind, s in Probe.seen if kind == "score"]
    assert fits == ["id_fit", "id_fit"]
    assert sorted(set(scores)) == ["id_val", "ood_val"]


def test_refuses_to_fit_on_validation_or_without_fit_data(probe, splits) -> None:
    with pytest.raises(DetectorError, match="id_fit"):
        tune("tune_probe", splits["id_val"], splits["ood_val"], grid={"column": [0]})
    with pytest.raises(DetectorError, match="validation"):
        tune("tune_probe", splits["id_val"], splits["ood_val"], id_fit=splits["id_val"], grid={"column": [0]})


def test_ties_keep_the_first_combination(probe, splits) -> None:
    result = tune(
        "tune_probe", splits["id_val"], splits["ood_val"], id_fit=splits["id_fit"], grid={"column": [2, 2, 0]}
    )
    assert result.table[0]["auroc"] == result.table[1]["auroc"]
    assert result.best_params == {"column": 2} and result.detector is not None
    assert result.detector.column == 2


def test_failed_combinations_are_reported_not_fatal(probe, splits) -> None:
    result = tune(
        "tune_probe", splits["id_val"], splits["ood_val"], id_fit=splits["id_fit"], grid={"column": [9, 2]}
    )
    assert "no column 9" in result.table[0]["error"] and math.isnan(result.table[0]["auroc"])
    assert result.best_params == {"column": 2}
    with pytest.raises(DetectorError, match="every combination failed"):
        tune(
            "tune_probe",
            splits["id_val"],
            splits["ood_val"],
            id_fit=splits["id_fit"],
            grid={"column": [7, 9]},
        )


def test_bad_grids_are_rejected(probe, splits) -> None:
    kwargs = {"id_fit": splits["id_fit"]}
    with pytest.raises(DetectorError, match="no parameter"):
        tune("tune_probe", splits["id_val"], splits["ood_val"], grid={"colum": [0]}, **kwargs)
    with pytest.raises(DetectorError, match="no candidate"):
        tune("tune_probe", splits["id_val"], splits["ood_val"], grid={"column": []}, **kwargs)
    with pytest.raises(DetectorError, match="both"):
        tune(
            "tune_probe",
            splits["id_val"],
            splits["ood_val"],
            grid={"column": [0]},
            fixed={"column": 1},
            **kwargs,
        )
    with pytest.raises(DetectorError, match="metric"):
        tune(
            "tune_probe",
            splits["id_val"],
            splits["ood_val"],
            grid={"column": [0]},
            metric="accuracy",
            **kwargs,
        )
    with pytest.raises(DetectorError, match="no default grid"):
        tune("tune_probe", splits["id_val"], splits["ood_val"], **kwargs)


# --------------------------------------------------------------------- a real method
def test_energy_temperature_search_matches_reference() -> None:
    rng = np.random.default_rng(1)
    # ID: one dominant class; OOD: flatter logits with a higher mean. The best temperature is not obvious.
    id_logits = rng.normal(0.0, 1.0, (150, 10))
    id_logits[np.arange(150), rng.integers(0, 10, 150)] += rng.uniform(2.0, 6.0, 150)
    ood_logits = rng.normal(0.8, 1.5, (130, 10))
    grid = [0.1, 1.0, 10.0, 100.0]

    def energy(z: np.ndarray, t: float) -> np.ndarray:
        m = (z / t).max(axis=1)
        return -t * (m + np.log(np.exp(z / t - m[:, None]).sum(axis=1)))

    expected = [ref_auroc(energy(id_logits, t), energy(ood_logits, t)) for t in grid]
    assert len(set(np.round(expected, 6))) == len(grid)  # the case does discriminate
    result = tune(
        "energy",
        Features(embedding=id_logits, logits=id_logits),
        Features(embedding=ood_logits, logits=ood_logits),
        grid={"temperature": grid},
    )
    np.testing.assert_allclose([r["auroc"] for r in result.table], expected, atol=1e-12)
    assert result.best_params == {"temperature": grid[int(np.argmax(expected))]}
    assert result.as_dict()["table"] == result.table


# --------------------------------------------------------------------- model-based methods
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, dtype=torch.float64)
        self.head = torch.nn.Linear(4, 3, dtype=torch.float64)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))


def test_tune_model_based_odin() -> None:
    net = Net().eval()
    parts = ClassifierParts(
        feature_map=net.feature_map,
        pool=net.pool,
        head=net.head,
        input_spec=InputSpec(size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    )
    gen = torch.Generator().manual_seed(2)
    id_images = torch.randn(20, 3, 4, 4, generator=gen, dtype=torch.float64) * 2.0
    ood_images = torch.randn(20, 3, 4, 4, generator=gen, dtype=torch.float64) * 0.5
    grid = {"temperature": [1, 1000], "epsilon": [0.0, 0.01]}
    result = tune_model_based("odin", parts, id_images, ood_images, grid=grid)
    assert [r["params"] for r in result.table] == [
        {"temperature": 1, "epsilon": 0.0},
        {"temperature": 1, "epsilon": 0.01},
        {"temperature": 1000, "epsilon": 0.0},
        {"temperature": 1000, "epsilon": 0.01},
    ]
    expected = []
    for row in result.table:
        det = create("odin", **row["params"])
        expected.append(ref_auroc(det.score_images(parts, id_images), det.score_images(parts, ood_images)))
    np.testing.assert_allclose([r["auroc"] for r in result.table], expected, atol=1e-12)
    assert result.best_params == result.table[int(np.argmax(expected))]["params"]
    with pytest.raises(DetectorError, match="tune_model_based"):
        tune("odin", Features(embedding=np.zeros((2, 2))), Features(embedding=np.zeros((2, 2))))
    with pytest.raises(DetectorError, match="features"):
        tune_model_based("energy", parts, id_images, ood_images)


# --------------------------------------------------------------------- default grids
def test_default_grids_match_registered_signatures() -> None:
    assert set(DEFAULT_GRIDS) == set(GRID_SOURCES)
    for name, cls in registered().items():
        if name not in DEFAULT_GRIDS:
            continue
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert set(DEFAULT_GRIDS[name]) <= accepted, f"default grid of {name} names unknown parameters"
        assert default_grid(name) == DEFAULT_GRIDS[name]
    assert default_grid("msp") == {}
    # OpenOOD v1.5 sweep lists, spot-checked
    assert DEFAULT_GRIDS["odin"] == {"temperature": [1, 10, 100, 1000], "epsilon": [0.0014, 0.0028]}
    assert DEFAULT_GRIDS["react"] == {"percentile": [85, 90, 95, 99]}


# --------------------------------------------------------------------- vision-language methods
class AxisText:
    """Text encoder: the prompt for class i is the unit vector on axis i (3-d)."""

    id = "axis-text"

    def encode_texts(self, texts):
        out = np.zeros((len(texts), 3), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, "abc".index(text.split()[-1].rstrip(".")[-1])] = 1.0
        return out


def test_zero_shot_and_few_shot_methods_are_tuned_with_the_text_encoder() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    id_emb = np.concatenate([[1, 0, 0] + 0.6 * rng.normal(size=(40, 3)), [0, 1, 0] + 0.6 * rng.normal(size=(40, 3))])
    ood_emb = [0, 0, 1] + 0.6 * rng.normal(size=(40, 3))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    id_val, ood_val = Features(embedding=unit(id_emb)), Features(embedding=unit(ood_emb))
    grid = {"temperature": [0.01, 1.0, 100.0]}
    with pytest.raises(DetectorError, match="text_encoder"):
        tune("mcm", id_val, ood_val, grid=grid, fixed={"classes": ["a", "b"]})
    result = tune("mcm", id_val, ood_val, grid=grid, fixed={"classes": ["a", "b"]}, text_encoder=AxisText())

    def mcm(x, t):  # -max softmax(cos / T) over the two class axes, written out
        z = x[:, :2] / t
        p = np.exp(z - z.max(1, keepdims=True))
        return -(p / p.sum(1, keepdims=True)).max(1)

    truth = np.r_[np.zeros(80), np.ones(40)]
    expected = [roc_auc_score(truth, np.r_[mcm(id_val.embedding, t), mcm(ood_val.embedding, t)])
                for t in grid["temperature"]]
    assert [row["auroc"] for row in result.table] == pytest.approx(expected, abs=1e-12)
    assert result.best_params == {"temperature": grid["temperature"][int(np.argmax(expected))]}

    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    few = tune("gda", id_val, ood_val, id_fit=Features(embedding=unit(id_emb[::-1].copy())), fit_labels=labels[::-1],
               grid={"alpha": [0.0, 1.0]}, fixed={"classes": ["a", "b"]}, text_encoder=AxisText())
    assert [row["error"] for row in few.table] == [None, None] and few.detector.is_fitted_
