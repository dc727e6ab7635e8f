"""The OODModel's guarantees, checked on real scores (EfficientNet-Lite0 on Fashion-MNIST).

The detector (KNN, k = 5) and the linear-probe head are fitted once on 60 Fashion-MNIST *train*
images of the six ID classes. A pool of 180 ID *test* images is then split at random, hundreds of
times, into a calibration set (n = 40) and ID test images; OOD images are near-OOD test classes
(Pullover, Coat, Shirt, Ankle boot). Every decision goes through ``OODModel.calibrate`` and
``OODModel.predict``.

Why the expected false-alarm rate is exact: for a random split of a fixed pool of distinct scores,
the rank of a test score among the n + 1 (calibration + it) is uniform, so the mean false-alarm rate
over splits is exactly floor((n + 1) alpha) / (n + 1) = 2/41 for n = 40, alpha = 0.05. Tolerances
are 3 standard errors: a per-split rate has variance <= alpha(1 - alpha)(1/m + 1/(n + 2)) (binomial
noise of m test images around a Beta-distributed conditional rate), the FDP is in [0, 1] with mean
<= b so its variance is <= b(1 - b) (Bhatia-Davis).

n = 40 is chosen so that an off-by-one quantile is visible: k = ceil(41 * 0.95) = 39, and the
mutant threshold at rank 38 (what ceil(n q) would give) has a false-alarm rate 3/41 = 0.073. With
n = 39, (n + 1)(1 - alpha) = 38 is an integer and ceil(n q) = ceil((n + 1) q) = 38: the two would
coincide and the check could not tell them apart.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oodscope.features.extract import extract
from oodscope.io import Subset, fashion_mnist_ood
from oodscope.pipeline import OODModel

pytestmark = pytest.mark.slow

ALPHA = 0.05
N_CAL = 40
SPLITS = 400


@pytest.fixture(scope="module")
def real(effnet_lite0):
    train = fashion_mnist_ood("train", per_class=10)
    test = fashion_mnist_ood("test", per_class=30)
    fit = extract(effnet_lite0, train.id, num_workers=0, progress=False)
    pool = extract(effnet_lite0, test.id, num_workers=0, progress=False)
    ood = extract(effnet_lite0, Subset(test.near_ood, np.arange(80)), num_workers=0, progress=False)
    assert not fit.failures and not pool.failures and not ood.failures
    model = OODModel(effnet_lite0, "knn", {"k": 5}, alpha=ALPHA, prediction_sets="aps", progress=False)
    model.fit(fit.features, labels=fit.labels, classes=test.id_class_names, ids=fit.hashes)
    return model, pool, ood


@pytest.fixture
def one_thread():
    # Hundreds of small calibrate/predict calls: torch's thread pool only adds overhead on them.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _split(rng: np.random.Generator, n_pool: int) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n_pool)
    return np.sort(perm[:N_CAL]), np.sort(perm[N_CAL:])


def check_false_alarm(rates: np.ndarray, n: int, m: int, alpha: float) -> None:
    """Mean false-alarm rate over splits: <= alpha + tol, and equal to its exact value within tol."""
    tol = 3 * math.sqrt(alpha * (1 - alpha) * (1 / m + 1 / (n + 2)) / len(rates))
    exact = math.floor((n + 1) * alpha + 1e-12) / (n + 1)
    mean = float(rates.mean())
    assert mean <= alpha + tol, f"false-alarm rate {mean:.4f} > alpha {alpha} + {tol:.4f}"
    assert abs(mean - exact) <= tol, f"false-alarm rate {mean:.4f} is not the exact {exact:.4f} (tol {tol:.4f})"


def test_false_alarm_rate_and_coverage(real, one_thread, capsys):
    model, pool, _ = real
    rng = np.random.default_rng(1)
    far, coverage, off_by_one = [], [], []
    for _ in range(SPLITS):
        cal, test = _split(rng, len(pool.hashes))
        model.calibrate(pool.features.subset(cal), pool.labels[cal], ids=[pool.hashes[i] for i in cal])
        preds = model.predict(pool.features.subset(test), progress=False)
        far.append(preds.ood.mean())
        coverage.append(preds.set_mask[np.arange(len(test)), pool.labels[test]].mean())
        # Mutant: the same calibration scores, threshold one rank too low (k - 1).
        cal_sorted = np.sort(model.pvalues_.cal_scores)
        k = math.ceil((N_CAL + 1) * (1 - ALPHA) - 1e-12)
        off_by_one.append((preds.scores > cal_sorted[k - 2]).mean())
        assert np.array_equal(preds.ood, preds.scores > model.threshold.value)  # p <= alpha <=> score > t
    far, coverage, off_by_one = map(np.asarray, (far, coverage, off_by_one))
    m = len(pool.hashes) - N_CAL
    with capsys.disabled():
        print(f"\n[guarantees] n={N_CAL} m={m} splits={SPLITS}: false-alarm {far.mean():.4f} (exact 2/41 = "
              f"{2 / 41:.4f}), off-by-one {off_by_one.mean():.4f} (3/41 = {3 / 41:.4f}), APS coverage "
              f"{coverage.mean():.4f} (target >= {1 - ALPHA})")
    check_false_alarm(far, N_CAL, m, ALPHA)
    with pytest.raises(AssertionError):
        check_false_alarm(off_by_one, N_CAL, m, ALPHA)
    # Randomized APS: coverage in [1 - alpha, 1 - alpha + 1/(n + 1)] on average (continuous scores).
    tol = 3 * math.sqrt(ALPHA * (1 - ALPHA) * (1 / m + 1 / (N_CAL + 2)) / SPLITS)
    assert coverage.mean() >= 1 - ALPHA - tol
    assert coverage.mean() <= 1 - ALPHA + 1 / (N_CAL + 1) + tol


def check_fdr(fdp: np.ndarray, bound: float) -> None:
    tol = 3 * math.sqrt(bound * (1 - bound) / len(fdp))
    assert fdp.mean() <= bound + tol, f"FDR {fdp.mean():.4f} > {bound:.4f} + {tol:.4f}"


def test_benjamini_hochberg_fdr_on_mixed_batches(real, one_thread, capsys):
    model, pool, ood = real
    q, m_id, m_ood = 0.2, 40, 40
    rng = np.random.default_rng(2)
    fdp, power, naive_fdp = [], [], []
    n_ood_pool = len(ood.hashes)
    for _ in range(300):
        cal, rest = _split(rng, len(pool.hashes))
        id_rows = rng.choice(rest, m_id, replace=False)
        ood_rows = rng.choice(n_ood_pool, m_ood, replace=False)
        model.calibrate(pool.features.subset(cal), pool.labels[cal], ids=[pool.hashes[i] for i in cal])
        batch = type(pool.features).concatenate([pool.features.subset(id_rows), ood.features.subset(ood_rows)])
        preds = model.predict(batch, fdr=q, progress=False)
        is_id = np.arange(m_id + m_ood) < m_id
        flagged = preds.ood_fdr
        fdp.append((flagged & is_id).sum() / max(flagged.sum(), 1))
        power.append(flagged[~is_id].mean())
        naive = preds.p_values <= q  # mutant: no multiplicity correction
        naive_fdp.append((naive & is_id).sum() / max(naive.sum(), 1))
    fdp, naive_fdp = np.asarray(fdp), np.asarray(naive_fdp)
    bound = q * m_id / (m_id + m_ood)
    with capsys.disabled():
        print(f"\n[guarantees] BH q={q} on {m_id} ID + {m_ood} near-OOD: FDR {fdp.mean():.4f} (bound {bound:.3f}), "
              f"power {np.mean(power):.3f}; uncorrected p <= q: FDR {naive_fdp.mean():.4f}")
    check_fdr(fdp, bound)
    with pytest.raises(AssertionError):
        check_fdr(naive_fdp, bound)
