"""Output-based detectors (logits only): max_logit, energy, entropy, temperature_msp, gen,
kl_matching, weighted_energy (and msp for the shared properties).

Every formula is recomputed here with plain NumPy/SciPy, independently of the torch code.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from oodscope.backbones.base import Features
from oodscope.detectors import Detector, DetectorError, create, load

LOGIT_METHODS = ["max_logit", "energy", "entropy", "temperature_msp", "gen", "kl_matching", "weighted_energy"]

WEIGHTS = [0.5, 1.0, 2.0, 0.25, 1.5]

# Three rows that can be checked by hand: peaked, flat, mixed.
TINY = np.array(
    [
        [2.0, 0.0, 0.0, -1.0],
        [1.0, 1.0, 1.0, 1.0],
        [0.0, 3.0, -2.0, 0.5],
    ]
)


@pytest.fixture
def classifier() -> Features:
    """A small random linear classifier: post-ReLU penultimate, head W/b, logits = h W^T + b."""
    rng = np.random.default_rng(0)
    n, d, c = 40, 8, 5
    h = np.maximum(rng.normal(size=(n, d)), 0.0) * rng.uniform(0.5, 3.0, size=(n, 1))
    w = rng.normal(size=(c, d))
    b = 0.1 * rng.normal(size=c)
    return Features(embedding=h, logits=h @ w.T + b, penultimate=h, weight=w, bias=b, backbone_id="toy")


def make(name: str, n_classes: int = 5, **params) -> Detector:
    """``create`` with weights for weighted_energy, which has no default (see its docstring)."""
    if name == "weighted_energy" and "class_weights" not in params:
        params["class_weights"] = WEIGHTS[:n_classes]
    return create(name, **params)


def fitted(name: str, fit_logits: np.ndarray, **params) -> Detector:
    det = make(name, n_classes=fit_logits.shape[1], **params)
    if det.needs_fit:
        det.fit({"logits": fit_logits})
    return det


# ----------------------------------------------------------------- NumPy references
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1))


def ref_max_logit(z):
    return -z.max(axis=1)


def ref_energy(z, t=1.0):
    return -t * np_logsumexp(z / t)


def ref_entropy(z):
    p = np_softmax(z)
    return -(p * np.log(p)).sum(axis=1)


def ref_temperature_msp(z, t=1000.0):
    return -np_softmax(z / t).max(axis=1)


def ref_gen(z, gamma=0.1, m=100):
    p = np.sort(np_softmax(z), axis=1)[:, -m:]
    return (p**gamma * (1 - p) ** gamma).sum(axis=1)


def ref_kl_matching(fit_z, z):
    fit_p, pred = np_softmax(fit_z), fit_z.argmax(axis=1)
    templates = [fit_p[pred == c].mean(axis=0) for c in range(fit_z.shape[1]) if (pred == c).any()]
    p = np_softmax(z)
    # scipy.stats.entropy(p, q) is KL(p || q): an implementation independent of ours.
    return np.array([min(scipy.stats.entropy(row, q) for q in templates) for row in p])


def ref_weighted_energy(z, w):
    w = np.maximum(np.asarray(w, dtype=float), 0.0)
    return -np.log((w * np.exp(z)).sum(axis=1))


def reference(name: str, fit_z: np.ndarray, z: np.ndarray) -> np.ndarray:
    return {
        "max_logit": lambda: ref_max_logit(z),
        "energy": lambda: ref_energy(z),
        "entropy": lambda: ref_entropy(z),
        "temperature_msp": lambda: ref_temperature_msp(z),
        "gen": lambda: ref_gen(z),
        "kl_matching": lambda: ref_kl_matching(fit_z, z),
        "weighted_energy": lambda: ref_weighted_energy(z, WEIGHTS[: z.shape[1]]),
    }[name]()


# ----------------------------------------------------------------- values
def test_hand_checked_values_on_the_flat_row():
    flat = TINY[1:2]
    np.testing.assert_allclose(make("max_logit").score(flat), [-1.0])
    np.testing.assert_allclose(make("energy").score(flat), [-(1.0 + np.log(4.0))])
    np.testing.assert_allclose(make("energy", temperature=2.0).score(flat), [-2.0 * (0.5 + np.log(4.0))])
    np.testing.assert_allclose(make("entropy").score(flat), [np.log(4.0)])
    np.testing.assert_allclose(make("temperature_msp").score(flat), [-0.25])
    np.testing.assert_allclose(make("gen").score(flat), [4 * (0.25 * 0.75) ** 0.1])
    np.testing.assert_allclose(
        make("weighted_energy", class_weights=[1.0, 2.0, 0.0, 1.0]).score(flat), [-(1.0 + np.log(4.0))]
    )


def test_hand_checked_values_on_the_peaked_row():
    row = TINY[0:1]  # logits 2, 0, 0, -1
    total = np.exp(2.0) + 2.0 + np.exp(-1.0)
    p = np.array([np.exp(2.0), 1.0, 1.0, np.exp(-1.0)]) / total
    np.testing.assert_allclose(make("max_logit").score(row), [-2.0])
    np.testing.assert_allclose(make("energy").score(row), [-np.log(total)])
    np.testing.assert_allclose(make("entropy").score(row), [-(p * np.log(p)).sum()])
    np.testing.assert_allclose(make("temperature_msp", temperature=1.0).score(row), [-p[0]])
    np.testing.assert_allclose(
        make("gen", M=2).score(row), [(p[0] * (1 - p[0])) ** 0.1 + (p[1] * (1 - p[1])) ** 0.1]
    )


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_matches_numpy_reference_tiny(name):
    det = fitted(name, TINY)
    np.testing.assert_allclose(det.score(TINY), reference(name, TINY, TINY), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_matches_numpy_reference_random(name, classifier):
    fit_z = classifier.logits[:25]
    z = classifier.logits[25:]
    det = fitted(name, fit_z)
    np.testing.assert_allclose(
        det.score(classifier.subset(slice(25, None))), reference(name, fit_z, z), rtol=1e-9
    )


def test_gen_clips_m_to_the_number_of_classes_and_honours_gamma():
    z = TINY
    np.testing.assert_allclose(make("gen", M=100).score(z), make("gen", M=4).score(z))
    np.testing.assert_allclose(make("gen", gamma=0.5, M=1).score(z), ref_gen(z, gamma=0.5, m=1), rtol=1e-12)
    assert not np.allclose(make("gen", M=1).score(z), make("gen", M=4).score(z))


def test_energy_and_temperature_msp_honour_temperature():
    z = TINY
    np.testing.assert_allclose(make("energy", temperature=3.0).score(z), ref_energy(z, 3.0), rtol=1e-12)
    np.testing.assert_allclose(make("temperature_msp", temperature=2.5).score(z), ref_temperature_msp(z, 2.5))


# ----------------------------------------------------------------- properties
@pytest.mark.parametrize("name", LOGIT_METHODS + ["msp"])
def test_peaked_scores_lower_than_flat(name):
    peaked = np.array([[8.0, 0.0, 0.0, 0.0]])
    flat = np.array([[2.0, 2.0, 2.0, 2.0]])  # same sum: a fair comparison for max_logit/energy
    fit_z = np.array([[9.0, 0.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    det = fitted(name, fit_z)
    assert det.score(peaked)[0] < det.score(flat)[0]


@pytest.mark.parametrize("name", ["msp", "entropy", "gen", "temperature_msp", "kl_matching"])
def test_invariant_to_adding_a_constant_to_all_logits(name, classifier):
    det = fitted(name, classifier.logits)
    z = classifier.logits
    np.testing.assert_allclose(det.score(z + 7.5), det.score(z), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["max_logit", "energy", "weighted_energy"])
def test_adding_a_constant_shifts_the_score_by_minus_that_constant(name, classifier):
    det = make(name)
    z = classifier.logits
    np.testing.assert_allclose(det.score(z + 7.5), det.score(z) - 7.5, rtol=1e-12, atol=1e-12)


def test_energy_temperature_limits(classifier):
    z = classifier.logits
    c = z.shape[1]
    # T -> 0: the energy tends to -max logit.
    np.testing.assert_allclose(make("energy", temperature=1e-4).score(z), -z.max(axis=1), atol=1e-3)
    # T -> inf: -T logsumexp(z/T) = -T log C - mean(z) + O(1/T).
    t = 1e5
    np.testing.assert_allclose(
        make("energy", temperature=t).score(z) + t * np.log(c), -z.mean(axis=1), atol=1e-3
    )


def test_temperature_msp_limits_and_monotonicity(classifier):
    z = classifier.logits
    c = z.shape[1]
    np.testing.assert_allclose(
        make("temperature_msp", temperature=1.0).score(z), make("msp").score(z), rtol=1e-12
    )
    np.testing.assert_allclose(make("temperature_msp", temperature=1e7).score(z), -1.0 / c, atol=1e-6)
    np.testing.assert_allclose(make("temperature_msp", temperature=1e-4).score(z), -1.0, atol=1e-9)
    # The largest softmax probability never grows with T, so the score never falls.
    scores = np.stack([make("temperature_msp", temperature=t).score(z) for t in (0.5, 1, 2, 10, 100, 1000)])
    assert np.all(np.diff(scores, axis=0) >= -1e-12)


def test_entropy_bounds(classifier):
    c = classifier.logits.shape[1]
    scores = make("entropy").score(classifier.logits)
    assert np.all(scores >= 0) and np.all(scores <= np.log(c) + 1e-12)
    np.testing.assert_allclose(make("entropy").score(np.zeros((2, c))), np.log(c))
    np.testing.assert_allclose(make("entropy").score(np.array([[800.0, 0.0, 0.0]])), [0.0], atol=1e-12)


def test_gen_is_zero_for_one_hot_and_largest_for_uniform():
    gen = make("gen")
    np.testing.assert_allclose(gen.score(np.array([[900.0, 0.0, 0.0]])), [0.0], atol=1e-12)
    uniform = gen.score(np.zeros((1, 3)))[0]
    assert uniform > gen.score(TINY[[0, 2], :3]).max()


def test_kl_matching_templates_use_predicted_classes():
    # Class 3 is never the argmax of the fit logits: it gets no template.
    fit_z = np.array([[3.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 4.0, 2.0], [2.5, 0.0, 0.0, 1.0]])
    det = create("kl_matching").fit({"logits": fit_z})
    assert det.fit_info_["classes_without_template"] == 1
    np.testing.assert_allclose(det.score(TINY), ref_kl_matching(fit_z, TINY), rtol=1e-9)
    # An image alone in its predicted class is its own template: KL 0, the minimum possible.
    np.testing.assert_allclose(det.score(fit_z[1:3]), [0.0, 0.0], atol=1e-12)
    assert np.all(det.score(TINY) >= 0)


def test_kl_matching_ignores_labels_and_rejects_other_class_counts():
    fit_z = TINY
    a = create("kl_matching").fit({"logits": fit_z}).score(TINY)
    b = create("kl_matching").fit({"logits": fit_z}, labels=[3, 3, 3]).score(TINY)
    np.testing.assert_array_equal(a, b)
    det = create("kl_matching").fit({"logits": fit_z})
    with pytest.raises(DetectorError, match="4 classes"):
        det.score(np.zeros((2, 5)))


def test_weighted_energy_weights():
    z = TINY
    # Equal weights w: the plain energy shifted by -log w.
    np.testing.assert_allclose(
        make("weighted_energy", class_weights=[3.0] * 4).score(z), ref_energy(z) - np.log(3.0), rtol=1e-12
    )
    # Zero and negative weights (ReLU'd, as in VOS) remove their class from the sum.
    dropped = make("weighted_energy", class_weights=[1.0, -2.0, 0.0, 1.0]).score(z)
    np.testing.assert_allclose(dropped, ref_energy(z[:, [0, 3]]), rtol=1e-12)
    with pytest.raises(DetectorError, match="4 classes"):
        make("weighted_energy", class_weights=[1.0, 1.0]).score(z)
    with pytest.raises(DetectorError, match="missing required parameter"):
        create("weighted_energy")  # no default: the weights come from VOS training
    with pytest.raises(DetectorError):
        create("weighted_energy", class_weights=[0.0, -1.0])


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_batch_order_invariance(name, classifier):
    det = fitted(name, classifier.logits)
    perm = np.random.default_rng(1).permutation(len(classifier))
    np.testing.assert_allclose(
        det.score(classifier.logits[perm]), det.score(classifier.logits)[perm], rtol=1e-12
    )


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_dtypes_and_containers_agree(name, classifier):
    z = classifier.logits
    det = fitted(name, z)
    expected = det.score(classifier)
    assert expected.dtype == np.float64 and expected.shape == (len(z),)
    np.testing.assert_allclose(det.score(z), expected, rtol=1e-12)
    np.testing.assert_allclose(det.score(torch.from_numpy(z)), expected, rtol=1e-12)
    np.testing.assert_allclose(det.score({"logits": z}), expected, rtol=1e-12)
    np.testing.assert_allclose(det.score(z.astype(np.float32)), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(
        det.score(torch.from_numpy(z.astype(np.float32))), expected, rtol=2e-5, atol=2e-5
    )


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_chunked_scoring_equals_unchunked(name, classifier):
    det = fitted(name, classifier.logits)
    whole = det.score(classifier)
    det.score_batch_size = 3
    # Batched kernels may round differently for other row counts: allow last-bit differences only.
    np.testing.assert_allclose(det.score(classifier), whole, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_save_load_roundtrip(name, classifier, tmp_path):
    det = fitted(name, classifier.logits[:20])
    det.save(tmp_path / name, backbone_id="toy")
    again = load(tmp_path / name, expected_backbone_id="toy")
    assert type(again) is type(det) and again.get_params() == det.get_params()
    np.testing.assert_array_equal(again.score(classifier), det.score(classifier))


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_missing_logits_is_a_clear_error(name, classifier):
    det = make(name)
    no_logits = Features(embedding=classifier.embedding, backbone_id="clip-like")
    with pytest.raises(DetectorError, match="logits"):
        det.fit(no_logits) if det.needs_fit else det.score(no_logits)


def test_kl_matching_refuses_to_fit_on_nothing():
    with pytest.raises(DetectorError, match="at least one"):
        create("kl_matching").fit(np.zeros((0, 4)))


def test_kl_matching_refuses_to_score_before_fit(classifier):
    with pytest.raises(DetectorError, match="fit"):
        create("kl_matching").score(classifier)


@pytest.mark.parametrize(
    "name, params",
    [
        ("energy", {"temperature": 0.0}),
        ("temperature_msp", {"temperature": -1.0}),
        ("gen", {"gamma": 0.0}),
        ("gen", {"M": 0}),
        ("gen", {"M": 2.5}),
    ],
)
def test_invalid_hyper_parameters(name, params):
    with pytest.raises(DetectorError):
        create(name, **params)


def test_declared_needs():
    for name in LOGIT_METHODS:
        cls = type(make(name))
        assert cls.requires == ("logits",)
        assert cls.needs_labels is False
        assert cls.needs_fit is (name == "kl_matching")
