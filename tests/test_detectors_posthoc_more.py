"""Six more post-hoc detectors (issue #15): Residual, Relation, pNML, OpenMax, WeiPer, VRA.

Each is compared with an independent NumPy / SciPy port of its official formula, written here
from the reference code (OpenOOD v1.5 ``residual_postprocessor.py`` / ``relation_postprocessor.py``,
the pNML authors' ``calc_regrets``, pytorch-ood's ``OpenMax`` + ``LibNotMR``, WeiPer's
``weiper_kldiv/utils.py``, VRA's ``ood_eval.py`` + ``models/resnet.py``) on tiny inputs, never
calling the detectors' helpers — plus one property each. Where the official score is an ID
confidence, ours is its negative (or, for Relation, a monotone transform: checked by ranks).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance

from oodscope.backbones.base import Features
from oodscope.detectors import create


# ----------------------------------------------------------------------------- data
def make_data(seed: int = 0, n: int = 90, d: int = 8, c: int = 3, relu: bool = False) -> tuple[Features, np.ndarray]:
    """A toy classifier: Gaussian classes in d dimensions and a nearest-mean linear head."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centres = rng.normal(0, 2, (c, d))
    pen = centres[y] + rng.normal(size=(n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)))
    if relu:
        pen = np.maximum(pen, 0.0)
    weight = centres.copy()
    bias = rng.normal(size=c)
    return feats(penultimate=pen, logits=pen @ weight.T + bias, weight=weight, bias=bias), y


def feats(**fields) -> Features:
    """Features with the given fields; ``embedding`` (required by Features, read by none of these) is a copy."""
    first = fields.get("penultimate", fields.get("logits"))
    return Features(embedding=first, **fields)


def subset(f: Features, rows: slice) -> Features:
    return feats(penultimate=f.penultimate[rows], logits=f.logits[rows], weight=f.weight, bias=f.bias)


def l2n(x: np.ndarray, eps: float = 0.0) -> np.ndarray:
    return x / np.sqrt((x**2).sum(axis=1, keepdims=True) + eps)


def close(got: np.ndarray, want: np.ndarray, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


# ----------------------------------------------------------------------------- vim_residual
def residual_reference(train: Features, test: Features, dim: int) -> np.ndarray:
    """OpenOOD ``ResidualPostprocessor``: u = -pinv(W) b, eigenvectors of the centred second moment."""
    u = -np.linalg.pinv(train.weight) @ train.bias
    ec = EmpiricalCovariance(assume_centered=True).fit(train.penultimate - u)
    vals, vecs = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray(vecs.T[np.argsort(vals * -1)[dim:]].T).real
    return -np.linalg.norm((test.penultimate - u) @ ns, axis=-1)  # the official ID confidence


def test_vim_residual_matches_openood_residual_up_to_sign():
    f, _ = make_data(0, n=80, d=8)
    train, test = subset(f, slice(0, 60)), subset(f, slice(60, 80))
    det = create("vim_residual", dim=3).fit(train)
    close(det.score(test), -residual_reference(train, test, 3))


def test_vim_residual_ignores_moves_inside_the_principal_subspace():
    f, _ = make_data(1, n=80, d=8)
    train, test = subset(f, slice(0, 60)), subset(f, slice(60, 80))
    det = create("vim_residual", dim=3).fit(train)
    u = -np.linalg.pinv(f.weight) @ f.bias
    vals, vecs = np.linalg.eigh((train.penultimate - u).T @ (train.penultimate - u) / 60)
    top = vecs[:, np.argsort(vals)[::-1][:3]]
    moved = test.penultimate + np.random.default_rng(2).normal(0, 5, (20, 3)) @ top.T
    base = det.score(test)
    close(det.score(feats(penultimate=moved, logits=test.logits, weight=f.weight, bias=f.bias)), base)
    # ...while a move along a residual direction changes it
    far = test.penultimate + 5 * vecs[:, np.argsort(vals)[0]]
    assert not np.allclose(det.score(feats(penultimate=far, logits=test.logits, weight=f.weight, bias=f.bias)), base)


# ----------------------------------------------------------------------------- relation
def relation_reference(train: Features, test: Features, power: float, thres: float = 0.03) -> np.ndarray:
    """The official ``get_relation`` with the ``cos_p`` kernel, one test image and one bank image at a time."""
    z, zt = l2n(test.penultimate, 1e-10), l2n(train.penultimate, 1e-10)
    p, pt = softmax(test.logits, axis=1), softmax(train.logits, axis=1)
    out = np.zeros(len(z))
    for i in range(len(z)):
        for j in range(len(zt)):
            rel = max(float(z[i] @ zt[j]), 0.0) * float(p[i] @ pt[j])
            if abs(rel) > thres:
                out[i] += np.sign(rel) * abs(rel) ** power
    return out  # the edge sum; OpenOOD returns it as the confidence, detect_ood.py scores 1 / (sum + 1e-6)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_relation_matches_the_official_kernel_sum(power):
    f, _ = make_data(3, n=70, d=6)
    train, test = subset(f, slice(0, 50)), subset(f, slice(50, 70))
    edge_sum = relation_reference(train, test, power)
    ours = create("relation", power=power).fit(train).score(test)
    close(ours, -edge_sum)
    # detect_ood.py's 1 / (sum + 1e-6) (higher = more OOD) ranks the images the same way
    official = 1.0 / (edge_sum + 1e-6)
    assert (np.argsort(ours, kind="stable") == np.argsort(official, kind="stable")).all()


def test_relation_is_invariant_to_the_feature_scale():
    f, _ = make_data(4, n=70, d=6)
    train, test = subset(f, slice(0, 50)), subset(f, slice(50, 70))
    base = create("relation").fit(train).score(test)
    scaled = create("relation").fit(
        feats(penultimate=3.7 * train.penultimate, logits=train.logits, weight=f.weight, bias=f.bias)
    )
    close(scaled.score(feats(penultimate=0.2 * test.penultimate, logits=test.logits)), base)


# ----------------------------------------------------------------------------- pnml
def pnml_reference(train: Features, test: Features) -> np.ndarray:
    """The authors' ``training_epoch_end`` + ``calc_regrets`` (features / ||features||, fc on them)."""
    x = l2n(train.penultimate)
    inv = np.linalg.pinv(x.T @ x, rcond=1e-15)
    z = l2n(test.penultimate)
    probs = softmax(z @ test.weight.T + test.bias, axis=1)
    regrets = np.zeros(len(z))
    for i in range(len(z)):
        proj = abs(float(z[i] @ inv @ z[i]))
        g = proj / (1 + proj)
        nf = sum(p / (p + (1 - p) * p**g) for p in probs[i])
        regrets[i] = np.log(nf) / np.log(probs.shape[1])
    return regrets  # the paper's ID score is 1 - regret


def test_pnml_matches_the_official_regret():
    f, _ = make_data(5, n=80, d=6, c=4)
    train, test = subset(f, slice(0, 60)), subset(f, slice(60, 80))
    close(create("pnml").fit(train).score(test), pnml_reference(train, test))


def test_pnml_regret_is_bounded_and_scale_invariant():
    f, _ = make_data(6, n=80, d=6, c=4)
    train, test = subset(f, slice(0, 60)), subset(f, slice(60, 80))
    det = create("pnml").fit(train)
    regret = det.score(test)
    assert (regret >= 0).all() and (regret <= 1).all()
    close(det.score(feats(penultimate=5.0 * test.penultimate, weight=f.weight, bias=f.bias)), regret)
    # far from the span of few ID images, the regret grows: fit on 4 images only
    few = create("pnml").fit(subset(f, slice(0, 4)))
    assert few.score(test).mean() > regret.mean()


# ----------------------------------------------------------------------------- openmax
def weibull_tail_reference(d: np.ndarray, tailsize: int):
    """pytorch-ood ``LibNotMR.fit_high`` with scipy: tail + 10000 - min, exponweib(a=1, loc=0) = weibull_min."""
    tail = np.sort(d)[-tailsize:]
    shift = tail.min()
    c, _, scale = stats.weibull_min.fit(tail + 10000 - shift, floc=0)
    return c, scale, shift


def test_weibull_tail_fit_matches_scipy_weibull_min():
    from oodscope.detectors.openmax import fit_weibull_tail, weibull_mle

    rng = np.random.default_rng(7)
    for _ in range(3):
        d = np.abs(rng.normal(3, 1, size=40))
        ours = fit_weibull_tail(d, 20)
        c, scale, shift = weibull_tail_reference(d, 20)
        assert ours.shift == shift
        np.testing.assert_allclose(ours.shape, c, rtol=1e-4)
        np.testing.assert_allclose(ours.scale, scale, rtol=1e-8)
        x = np.sort(d)[-20:] + 10000 - shift
        # maximum likelihood: ours is at least as likely as scipy's numerical optimum
        assert stats.weibull_min.logpdf(x, ours.shape, scale=ours.scale).sum() >= (
            stats.weibull_min.logpdf(x, c, scale=scale).sum() - 1e-9
        )
        # an unshifted sample too
        y = rng.weibull(2.0, size=25) * 3
        k, lam = weibull_mle(y)
        c2, _, s2 = stats.weibull_min.fit(y, floc=0)
        np.testing.assert_allclose([k, lam], [c2, s2], rtol=1e-4)


def openmax_reference(fit_logits, labels, test_logits, tailsize, alpha):
    """pytorch-ood ``OpenMax`` (numpy.py) on correctly classified samples (the paper), Euclidean distance.

    pytorch-ood fills distances only for classes some image of the batch is predicted as (0 for the
    others, a batch dependence); as OSDN's ``compute_openmax``, every top-alpha class's distance is used.
    """
    n_classes = fit_logits.shape[1]
    correct = fit_logits.argmax(1) == labels
    centres, models = {}, {}
    for c in range(n_classes):
        rows = fit_logits[(labels == c) & correct]
        centres[c] = rows.mean(axis=0)
        models[c] = weibull_tail_reference(np.linalg.norm(rows - centres[c], axis=1), tailsize)
    alpha = min(alpha, n_classes)
    out = np.zeros(len(test_logits))
    for j, v in enumerate(test_logits):
        top = np.argsort(v)[-alpha:][::-1]
        ranked = np.zeros(n_classes)
        ranked[top] = [((alpha + 1) - i) / alpha for i in range(1, alpha + 1)]
        ws = np.ones(n_classes)
        for c in top:
            k, scale, shift = models[c]
            ws[c] = stats.exponweib.cdf(np.linalg.norm(v - centres[c]) + 10000 - shift, a=1, c=k, loc=0, scale=scale)
        wscores = 1 - ws * ranked
        revised = np.concatenate([[np.sum(v * (1 - wscores))], v * wscores])
        out[j] = softmax(np.minimum(revised, 709))[0]
    return out


@pytest.mark.parametrize("alpha", [2, 10])
def test_openmax_matches_pytorch_ood_unknown_probability(alpha):
    f, y = make_data(8, n=120, d=6, c=4)
    fit_f, test_f = subset(f, slice(0, 100)), subset(f, slice(100, 120))
    test_logits = np.concatenate([test_f.logits, 3 * test_f.logits[:5]])  # a few far from every centre
    det = create("openmax", tailsize=20, alpha=alpha).fit(fit_f, y[:100])
    want = openmax_reference(fit_f.logits, y[:100], test_logits, 20, alpha)
    close(det.score(feats(logits=test_logits)), want, tol=1e-5)


def test_openmax_unknown_probability_grows_away_from_the_class_centre():
    f, y = make_data(9, n=120, d=6, c=4)
    det = create("openmax", alpha=2).fit(f, y)
    centre = det.state_["means"][0].numpy()
    direction = f.logits[0] - centre
    rays = np.stack([centre + t * direction for t in np.linspace(0, 1.0, 25)])
    assert (rays.argmax(1) == np.argmax(centre)).all()  # class 0 stays ranked first along the ray
    p = det.score(feats(logits=rays))
    # at the mean activation vector the unknown class has (almost) no mass; beyond the fitted tail it dominates
    assert p[0] < 1e-6 and p[-1] > 0.5
    assert (np.diff(p[len(p) // 2 :]) > 0).all()  # and it rises steadily through the tail
    assert ((0 <= p) & (p <= 1)).all()


# ----------------------------------------------------------------------------- weiper
def weiper_reference(train: Features, test: Features, directions: np.ndarray, *, delta, n_bins, lambda_1,
                     lambda_2, s1, s2, eps=0.01, eps_noise=0.025) -> np.ndarray:
    """WeiPer's ``calculate_WeiPerKLDiv_score`` (exact_minmax), one image at a time."""
    w, b = train.weight, train.bias
    heads = np.concatenate([w + delta * np.linalg.norm(w, axis=1)[:, None] * d for d in directions])  # (rC, D)
    bias = np.concatenate([b] * len(directions))

    def density(values, lo, hi):  # batch_histogram(probability=True) of one image's values
        edges = np.concatenate([[-np.inf], np.linspace(lo, hi + 1e-8, n_bins + 1), [np.inf]])
        counts = np.array([np.mean((values >= edges[k]) & (values < edges[k + 1])) for k in range(n_bins + 2)])
        return counts[1:-1] / counts.sum()

    def smooth(q, s):  # UniformKernel: Conv1d(padding="same", padding_mode="replicate"), weights 1/s
        left = (s - 1) // 2
        padded = np.concatenate([[q[0]] * left, q, [q[-1]] * (s - 1 - left)])
        return np.array([padded[i : i + s].mean() for i in range(len(q))])

    def kldiv(p, q, e, s):
        q_, p_ = smooth(q, s) + e, p + e
        p_, q_ = p_ / p_.sum(), q_ / q_.sum()
        return -(p_ * (np.log(q_) - np.log(p_))).sum() - (q_ * (np.log(p_) - np.log(q_))).sum()

    lat_tr, per_tr = train.penultimate, train.penultimate @ heads.T + bias
    lo, hi, lo_p, hi_p = lat_tr.min(), lat_tr.max(), per_tr.min(), per_tr.max()
    mean_d = np.mean([density(x, lo, hi) for x in lat_tr], axis=0)
    mean_dp = np.mean([density(x, lo_p, hi_p) for x in per_tr], axis=0)
    out = []
    c = w.shape[0]
    for x in test.penultimate:
        per = x @ heads.T + bias
        msp = np.mean([softmax(per[i * c : (i + 1) * c]).max() for i in range(len(directions))])
        u = kldiv(mean_d, density(x, lo, hi), eps, s1)
        u_w = kldiv(mean_dp, density(per, lo_p, hi_p), eps_noise, s2)
        out.append(-(u + lambda_1 * u_w - lambda_2 * msp))  # the official ID confidence
    return np.array(out)


@pytest.mark.parametrize("smoothing", [(4, 5), (3, 2)])
def test_weiper_kld_matches_the_official_score_up_to_sign(smoothing):
    from oodscope.detectors.weiper import perturbation_directions

    f, _ = make_data(10, n=70, d=12, c=3, relu=True)
    train, test = subset(f, slice(0, 50)), subset(f, slice(50, 70))
    params = dict(n_repeats=4, delta=1.8, n_bins=12, lambda_1=2.5, lambda_2=0.1, seed=3)
    det = create("weiper", smoothing=smoothing[0], smoothing_perturbed=smoothing[1], **params).fit(train)
    directions = perturbation_directions(3, 4, 3, 12).numpy()  # the seeded draw; the formula is ported below
    want = weiper_reference(train, test, directions, delta=1.8, n_bins=12, lambda_1=2.5, lambda_2=0.1,
                            s1=smoothing[0], s2=smoothing[1])
    close(det.score(test), -want)


def test_weiper_msp_without_perturbation_is_msp_and_kld_ignores_unit_order():
    f, _ = make_data(11, n=70, d=12, c=3, relu=True)
    train, test = subset(f, slice(0, 50)), subset(f, slice(50, 70))
    det = create("weiper", variant="msp", delta=0.0, n_repeats=3).fit(train)
    close(det.score(test), -softmax(test.logits, axis=1).max(axis=1))
    # the latent histogram counts values over units: permuting the units (and W's columns) changes nothing
    perm = np.random.default_rng(0).permutation(12)
    only_latent = dict(lambda_1=0.0, lambda_2=0.0, n_bins=10)
    base = create("weiper", **only_latent).fit(train).score(test)
    permuted = lambda g: feats(penultimate=g.penultimate[:, perm], weight=f.weight[:, perm], bias=f.bias)  # noqa: E731
    close(create("weiper", **only_latent).fit(permuted(train)).score(permuted(test)), base)


# ----------------------------------------------------------------------------- vra
def vra_reference(train: Features, test: Features, q1: float, q2: float, lamb: float) -> np.ndarray:
    """VRA's ``ood_eval.py`` (per-unit quantiles of the ID features) and ``ResNet.forward`` with ``clip2``."""
    featmin = np.quantile(train.penultimate, q1, axis=0)
    featmax = np.quantile(train.penultimate, q2, axis=0)
    x = test.penultimate + lamb
    x = np.where(x < featmin + lamb, 0.0, x)
    x = np.where(x > featmax + lamb, np.broadcast_to(featmax, x.shape), x)
    return logsumexp(x @ test.weight.T + test.bias, axis=1)  # the official energy confidence


@pytest.mark.parametrize(("q", "lamb"), [((0.6, 0.9), 0.0), ((0.6, 0.95), 0.6), ((0.1, 0.8), 0.3)])
def test_vra_matches_the_official_rectification_up_to_sign(q, lamb):
    f, _ = make_data(12, n=80, d=8, relu=True)
    train, test = subset(f, slice(0, 60)), subset(f, slice(60, 80))
    det = create("vra", percentile_low=100 * q[0], percentile_high=100 * q[1], gamma=lamb).fit(train)
    close(det.score(test), -vra_reference(train, test, q[0], q[1], lamb))


def test_vra_global_thresholds_and_identity_limit():
    f, _ = make_data(13, n=80, d=8, relu=True)
    train, test = subset(f, slice(0, 60)), subset(f, slice(60, 80))
    det = create("vra", percentile_low=20, percentile_high=80, scope="global").fit(train)
    lo, hi = np.percentile(train.penultimate, 20), np.percentile(train.penultimate, 80)
    h = np.where(test.penultimate < lo, 0.0, np.minimum(test.penultimate, hi))
    close(det.score(test), -logsumexp(h @ f.weight.T + f.bias, axis=1))
    # thresholds at the ID minimum and maximum rectify nothing on the ID data: VRA is the energy
    ident = create("vra", percentile_low=0, percentile_high=100).fit(train)
    close(ident.score(train), -logsumexp(train.logits, axis=1))
