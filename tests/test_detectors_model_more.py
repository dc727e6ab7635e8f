"""AdaSCALE, Gram, NAC-UE, the Mahalanobis ensemble with input pre-processing, Mahalanobis + ODIN
and MC Dropout against independent ports of the official formulas, on tiny float64 torch models.

Each reference below is written from the official code (OpenOOD v1.5 postprocessors, pytorch-ood
``MCD``) with its own loops / NumPy and the raw ``nn.Module`` (forward hooks, ``.backward()``), not
through ``ClassifierParts`` or our helpers. Unless a test says otherwise the scores agree to 1e-6
relative (float64 models). Properties: cross-checks with detectors they reduce to (SCALE,
Mahalanobis, multi-layer Mahalanobis), batch independence, and the errors users meet.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from oodscope.backbones.base import ClassifierParts, Features, InputSpec
from oodscope.backbones.torch_classifier import TorchClassifier
from oodscope.detectors import DetectorError, create, load
from oodscope.detectors.fitting import fit_detector
from oodscope.detectors.mc_dropout import dropout_modules

# OpenOOD's input pre-processing divides the sign by 0.5 (its hard-coded std): use that std here.
SPEC = InputSpec(size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
N_CLASSES = 4


class SmoothCNN(torch.nn.Module):
    """conv -> softplus -> conv -> softplus (``body``, (N, 12, 2, 2)) -> average pool -> Linear(12, 4).

    Softplus keeps every activation and input gradient distinct and non-zero, so top-k choices
    have no ties that two implementations could break differently."""

    def __init__(self, seed: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.Softplus(),
            torch.nn.Conv2d(6, 12, 3, stride=2, padding=1), torch.nn.Softplus(),
        )
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.drop = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.fc = torch.nn.Linear(12, N_CLASSES)
        with torch.no_grad():
            self.fc.weight.mul_(6.0)  # softmaxes far from uniform
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.body(x)).flatten(1)))

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)


def backbone(net: SmoothCNN, **options) -> TorchClassifier:
    return TorchClassifier(net, "fc", feature_map="body", input_spec=SPEC, device="cpu", **options)


def images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64) + shift


@pytest.fixture(scope="module")
def net() -> SmoothCNN:
    return SmoothCNN(0)


@pytest.fixture(scope="module")
def id_images() -> torch.Tensor:
    return images(60, seed=1)


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return torch.cat([images(6, seed=2), images(6, seed=3, shift=1.5)])


def labels_of(net: SmoothCNN, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(x).argmax(dim=1).numpy()


def close(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-6) -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale)


# =========================================================================== AdaSCALE
def ref_adascale(net: SmoothCNN, fit_x: torch.Tensor, test_x: torch.Tensor, *, logit_scaling: bool,
                 percentile=(75, 85), k1=5, k2=1, lmbda=10.0, o=0.05) -> np.ndarray:
    """OpenOOD ``AdaScalePostprocessor`` (setup / set_hyperparam / postprocess) and ``ada_scale``."""

    def forward_with_grad(data):
        data = data.clone().requires_grad_(True)
        feature = net.penultimate(data)
        output = net.fc(feature)
        labels = output.detach().argmax(dim=1)
        score = output[torch.arange(len(labels)), labels]
        score.backward(torch.ones_like(score))
        return feature.detach().numpy(), data.grad.detach()

    def perturb(data, grad):
        b, c, h, w = data.shape
        n_pixels = int(c * h * w * o)
        abs_grad = grad.abs().reshape(b, -1).numpy()
        mask = np.zeros_like(abs_grad)
        for i in range(b):
            mask[i, np.argsort(abs_grad[i], kind="stable")[:n_pixels]] = 1  # smallest |grad|
        return data + grad.sign() * torch.from_numpy(mask).reshape(data.shape) * 0.5

    def stats(data):
        feature, grad = forward_with_grad(data)
        with torch.no_grad():
            perturbed = net.penultimate(perturb(data, grad)).numpy()
        return feature, perturbed, np.abs(feature - perturbed)

    def q_prime(feature, perturbed, shift, k1_, k2_):
        out = []
        for f, p, s in zip(feature, perturbed, shift, strict=True):
            order = np.argsort(-f, kind="stable")
            out.append(np.maximum(p[order[:k1_]], 0).sum() + lmbda * s[order[:k2_]].sum())
        return np.array(out)

    f_id, p_id, s_id = stats(fit_x)
    d = f_id.shape[1]
    k1_, k2_ = int(d * k1 / 100), int(d * k2 / 100)
    id_sorted = np.sort(q_prime(f_id, p_id, s_id, k1_, k2_))
    f, p, s = stats(test_x)
    ecdf = np.searchsorted(id_sorted, q_prime(f, p, s, k1_, k2_), side="right") / len(id_sorted)  # statsmodels ECDF
    pct = percentile[0] + (1 - ecdf) * (percentile[1] - percentile[0])
    scores = []
    w, b = net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy()
    for feature, pc in zip(f, pct, strict=True):
        x = np.maximum(feature, 0)
        k = d - int(np.round(d * pc / 100.0))
        scale = x.sum() / np.sort(x)[::-1][:k].sum()
        logits = (feature @ w.T + b) * scale**2 if logit_scaling else (feature * np.exp(scale)) @ w.T + b
        top = logits.max()
        scores.append(-(top + np.log(np.exp(logits - top).sum())))
    return np.array(scores)


@pytest.mark.parametrize("name", ["adascale_a", "adascale_l"])
def test_adascale_matches_the_openood_postprocessor(name, net, id_images, test_images) -> None:
    # k1 = 25 %, k2 = 10 % of 12 units: OpenOOD's int(D k / 100) is then >= 1, where our max(1, .) agrees.
    params = dict(k1=25.0, k2=10.0, lmbda=10.0, o=0.05, min_percentile=60.0, max_percentile=90.0)
    det = create(name, **params).fit(parts=backbone(net).classifier_parts(), images=id_images)
    ours = det.score_images(backbone(net).classifier_parts(), test_images)
    ref = ref_adascale(net, id_images, test_images, logit_scaling=name == "adascale_l", percentile=(60, 90),
                       k1=25, k2=10, lmbda=10.0, o=0.05)
    close(ours, ref)
    # the percentile really adapts: neither end of the range alone gives these scores
    for fixed in ((60, 60), (90, 90)):
        alone = ref_adascale(net, id_images, test_images, logit_scaling=name == "adascale_l", percentile=fixed,
                             k1=25, k2=10)
        assert not np.allclose(ours, alone, rtol=1e-4)


def test_adascale_with_a_fixed_percentile_is_scale(net, id_images, test_images) -> None:
    """min_percentile == max_percentile: AdaSCALE-A is SCALE at that percentile (Xu et al., ICLR 2024)."""
    parts = backbone(net).classifier_parts()
    det = create("adascale_a", min_percentile=80.0, max_percentile=80.0).fit(parts=parts, images=id_images)
    feats = backbone(net).encode_images(test_images)
    close(det.score_images(parts, test_images), create("scale", percentile=80.0).score(feats), rtol=1e-5)


def test_adascale_needs_the_network_at_fit_and_a_fit_before_scoring(net, id_images) -> None:
    det = create("adascale_a")
    with pytest.raises(DetectorError, match="images"):
        det.fit()
    with pytest.raises(DetectorError, match="fit"):
        det.score_images(backbone(net).classifier_parts(), id_images[:2])
    with pytest.raises(DetectorError, match="percentile"):
        create("adascale_l", min_percentile=90.0, max_percentile=80.0)


# =========================================================================== Gram
def ref_gram_fit_score(maps_fit, y, logits_test, maps_test, powers=(1, 2, 3, 4, 5), seed=0):
    """OpenOOD ``gram_postprocessor``: G_p, delta, sample_estimator, get_deviations (NumPy loops).

    The 10 % validation split follows the documented rule: per class in sorted order,
    ``torch.randperm(L, generator)`` of one generator seeded with ``seed``, the first ``int(0.1 L)``."""

    def g_p(fmap, p):  # one image (C, h, w)
        t = fmap.reshape(fmap.shape[0], -1) ** p
        s = (t @ t.T).sum(axis=1)
        return np.sign(s) * np.abs(s) ** (1 / p)

    def delta(mins, maxs, x):
        below = np.maximum(mins - x, 0) / np.abs(mins + 1e-6)
        return below.sum() + (np.maximum(x - maxs, 0) / np.abs(maxs + 1e-6)).sum()

    gen = torch.Generator().manual_seed(seed)
    val = np.zeros(len(y), dtype=bool)
    for c in sorted(set(y.tolist())):
        rows = np.flatnonzero(y == c)
        perm = torch.randperm(len(rows), generator=gen).numpy()
        val[rows[perm[: int(0.1 * len(rows))]]] = True
    layers = sorted(maps_fit)
    mins, maxs, norms = {}, {}, []
    for layer in layers:
        deltas = []
        feats = {p: np.stack([g_p(m, p) for m in maps_fit[layer]]) for p in powers}
        for c in sorted(set(y.tolist())):
            for p in powers:
                trn = feats[p][(y == c) & ~val]
                mins[layer, p, c], maxs[layer, p, c] = trn.min(axis=0), trn.max(axis=0)
        for i in np.flatnonzero(val):
            deltas.append(sum(delta(mins[layer, p, y[i]], maxs[layer, p, y[i]], feats[p][i]) for p in powers))
        norms.append(np.mean(deltas))
    scores = []
    for i, row in enumerate(logits_test):
        prob = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        pred = int(prob.argmax())
        dev = 0.0
        for layer, n in zip(layers, norms, strict=True):
            maps = maps_test[layer][i]
            dev += sum(delta(mins[layer, p, pred], maxs[layer, p, pred], g_p(maps, p)) for p in powers) / n
        scores.append(dev / prob.max())
    return np.array(scores)


def gram_data(seed: int, n: int, shift: float = 0.0) -> Features:
    rng = np.random.default_rng(seed)
    dense = {"a": np.abs(rng.normal(1.0 + shift, 0.5, (n, 5, 3, 3))), "b": rng.normal(0.2, 1.0, (n, 7, 2, 2))}
    logits = rng.normal(0, 2.0, (n, 3))
    return Features(embedding=np.zeros((n, 1)), logits=logits, dense=dense)


def test_gram_matches_the_openood_postprocessor() -> None:
    fit = gram_data(0, 90)
    y = np.repeat(np.arange(3), 30)
    test = Features.concatenate([gram_data(1, 8), gram_data(2, 8, shift=1.0)])
    det = create("gram").fit(fit, y)
    ref = ref_gram_fit_score(fit.dense, y, test.logits, test.dense)
    close(det.score(test), ref, rtol=1e-8)
    assert np.ptp(ref) > 0


def test_gram_properties() -> None:
    fit = gram_data(0, 90)
    y = np.repeat(np.arange(3), 30)
    det = create("gram", powers=[1, 2]).fit(fit, y)
    # the fit images that set the bounds (90 % of each class) lie inside their class range: deviation 0
    own = fit.subset(np.flatnonzero(y == 0))
    own.logits = np.tile([[10.0, 0.0, 0.0]], (len(own), 1))
    assert (det.score(own) == 0).sum() >= 27
    # scaling a map away from the ID range only increases the deviation
    base = gram_data(3, 5)
    far = gram_data(3, 5)
    far.dense = {k: v * 3.0 for k, v in far.dense.items()}
    assert (det.score(far) >= det.score(base)).all() and (det.score(far) > det.score(base)).any()
    again = load(_saved(det))
    np.testing.assert_array_equal(again.score(base), det.score(base))
    with pytest.raises(DetectorError, match="dense"):
        create("gram").fit(Features(embedding=np.zeros((4, 1)), logits=np.zeros((4, 3))), np.zeros(4, dtype=int))


def _saved(det):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / det.name
    det.save(path)
    return path


# =========================================================================== NAC-UE
def ref_logspace(base=1e3, num=50):
    """OpenOOD ``nac/coverage.py`` ``logspace``."""
    num = int(num / 2)
    x = np.linspace(1, np.sqrt(base), num=num)
    x_l = np.emath.logn(base, x)
    x_r = (1 - x_l)[::-1]
    x = np.concatenate([x_l[:-1], x_r])
    x[-1] += 1e-2
    return np.append(x, 1.2)


def ref_nac_states(net: SmoothCNN, x: torch.Tensor, layers, sig_alpha):
    """Forward hooks on ``avgpool`` (OpenOOD's layer) and ``body`` (ResNet's layer4), ``kl_grad``, then
    ``avg_pooling`` (sum over cells of o and of g) and ``sigmoid(o * g_kl)``."""
    modules = {"penultimate": net.pool, "feature_map": net.body}
    kept = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: kept.__setitem__(n, o)) for n in layers]
    try:
        outputs = net(x)
    finally:
        for h in hooks:
            h.remove()
    targets = torch.ones_like(outputs) / outputs.shape[-1]
    loss = torch.sum(-targets * torch.log_softmax(outputs, dim=-1), dim=-1)
    out = {}
    for j, n in enumerate(layers):
        grad = torch.autograd.grad(loss.sum(), kept[n], retain_graph=j < len(layers) - 1)[0]
        o, g = kept[n].detach().sum(dim=(2, 3)).numpy(), grad.sum(dim=(2, 3)).numpy()
        out[n] = 1 / (1 + np.exp(-sig_alpha * o * g))
    return out


def ref_nac(net, fit_x, test_x, layers=("penultimate",), m=50, o_star=50, sig_alpha=100.0):
    """OpenOOD ``KMNC`` with its ``Estimator``: update (histogram), get_score, ood_test."""
    thresh = ref_logspace(1e3, m)
    fit_states = ref_nac_states(net, fit_x, layers, sig_alpha)
    test_states = ref_nac_states(net, test_x, layers, sig_alpha)
    scores = np.zeros(len(test_x))
    for n in layers:
        s = fit_states[n]
        t_act = np.zeros((m - 1, s.shape[1]))
        for k in range(m - 1):
            t_act[k] = ((s >= thresh[k]) & (s < thresh[k + 1])).sum(axis=0)
        n_cov = np.minimum(t_act / o_star, 1.0)
        st = test_states[n]
        b_act = (st[:, None, :] >= thresh[None, :-1, None]) & (st[:, None, :] < thresh[None, 1:, None])
        scores += (b_act * n_cov[None]).sum(axis=1).mean(axis=1) / len(layers)
    return -scores


@pytest.mark.parametrize("layers", [None, ["penultimate", "feature_map"]])
def test_nac_ue_matches_the_official_coverage(layers, net, id_images, test_images) -> None:
    # o * g are ~0.5 here (the scale is net-specific); O* = the 60 fit images, so coverage is graded
    det = create("nac_ue", layers=layers, bins=20, o_star=60.0, sig_alpha=10.0)
    det.fit(parts=backbone(net).classifier_parts(), images=id_images)
    ours = det.score_images(backbone(net).classifier_parts(), test_images)
    ref = ref_nac(net, id_images, test_images, layers=tuple(layers or ["penultimate"]), m=20, o_star=60.0,
                  sig_alpha=10.0)
    close(ours, ref, rtol=1e-9)
    assert np.ptp(ref) > 0 and (ours >= -1).all() and (ours <= 0).all()


def test_nac_ue_covers_its_own_fit_images_fully_with_o_star_1(net, id_images) -> None:
    """With O* = 1 every bin an ID image fell into is fully covered: its own score is -1."""
    parts = backbone(net).classifier_parts()
    det = create("nac_ue", o_star=1.0, sig_alpha=3.0).fit(parts=parts, images=id_images)
    np.testing.assert_allclose(det.score_images(parts, id_images[:7]), -1.0)
    with pytest.raises(DetectorError, match="even"):
        create("nac_ue", bins=15)


# =========================================================================== Mahalanobis with input pre-processing
def ref_lee_layer(net, layer_fn, fit_x, y, test_x, magnitude):
    """OpenOOD ``mds_ensemble_postprocessor``: get_MDS_stat (EmpiricalCovariance of class-centred
    features) and compute_Mahalanobis_score for one layer ('mean' features, no dim reduction).
    Returns the perturbed squared distance min_c MD = -2 * max_c gaussian score."""
    from sklearn.covariance import EmpiricalCovariance

    with torch.no_grad():
        feats = layer_fn(fit_x).numpy()
    classes = sorted(set(y.tolist()))
    means = np.stack([feats[y == c].mean(axis=0) for c in classes])
    centred = np.concatenate([feats[y == c] - means[k] for k, c in enumerate(classes)])
    precision = EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    mean_t, prec_t = torch.from_numpy(means), torch.from_numpy(precision)

    data = test_x.clone().requires_grad_(True)
    out = layer_fn(data)
    gaussian = torch.stack([-0.5 * ((out.detach() - mu) @ prec_t * (out.detach() - mu)).sum(1) for mu in mean_t], 1)
    pred = gaussian.max(1)[1]
    zero_f = out - mean_t.index_select(0, pred)
    pure_gau = -0.5 * torch.mm(torch.mm(zero_f, prec_t), zero_f.t()).diag()
    torch.mean(-pure_gau).backward()
    gradient = (torch.ge(data.grad, 0).double() - 0.5) * 2 / 0.5
    temp = data.detach() - magnitude * gradient
    with torch.no_grad():
        noise_out = layer_fn(temp)
    noise = torch.stack([-0.5 * ((noise_out - mu) @ prec_t * (noise_out - mu)).sum(1) for mu in mean_t], 1)
    return (-2 * noise.max(1)[0]).numpy(), feats, means, precision


def test_mahalanobis_odin_matches_lee_et_al(net, id_images, test_images) -> None:
    y = labels_of(net, id_images)
    bb = backbone(net)
    det = fit_detector(create("mahalanobis_odin", epsilon=0.01), bb.encode_images(id_images), y)
    ours = det.score_images(bb.classifier_parts(), test_images)
    ref, *_ = ref_lee_layer(net, net.penultimate, id_images, y, test_images, 0.01)
    close(ours, ref, rtol=1e-5)  # fitted on float32 Features, the reference on float64 features
    # the pre-processing moves every image closer to its class (Lee et al.'s point)
    plain, *_ = ref_lee_layer(net, net.penultimate, id_images, y, test_images, 0.0)
    assert (ours < plain).all()


def test_mahalanobis_odin_without_noise_is_mahalanobis(net, id_images, test_images) -> None:
    y = labels_of(net, id_images)
    bb = backbone(net)
    fit = bb.encode_images(id_images)
    det = fit_detector(create("mahalanobis_odin", epsilon=0.0), fit, y)
    plain = fit_detector(create("mahalanobis", feature="penultimate"), fit, y)
    close(det.score_images(bb.classifier_parts(), test_images), plain.score(bb.encode_images(test_images)), rtol=1e-5)


def layer_fns(net: SmoothCNN):
    """Pooled ('mean') outputs of body.1 and body.3, as Features.layers holds them."""
    return {
        "body.1": lambda x: net.body[:2](x).mean(dim=(2, 3)),
        "body.3": lambda x: net.body(x).mean(dim=(2, 3)),
    }


def test_mds_ensemble_matches_lee_et_al_per_layer_and_its_id_zscores(net, id_images, test_images) -> None:
    y = labels_of(net, id_images)
    bb = backbone(net, layers=["body.1", "body.3"])
    det = fit_detector(create("mds_ensemble", epsilon=0.01, weights=[1.0, 0.5]), bb.encode_images(id_images), y)
    ours = det.score_images(bb.classifier_parts(), test_images)
    ref = np.zeros(len(test_images))
    for w, fn in zip([1.0, 0.5], layer_fns(net).values(), strict=True):
        s, feats, means, precision = ref_lee_layer(net, fn, id_images, y, test_images, 0.01)
        # ID statistics of the clean distances over the fit features (the documented weighting)
        clean = np.array([min((f - mu) @ precision @ (f - mu) for mu in means) for f in feats])
        ref += w * (s - clean.mean()) / clean.std()
    close(ours, ref, rtol=1e-4)  # float32 fit features vs float64 reference, through a z-score
    assert np.ptp(ref) > 0


def test_mds_ensemble_without_noise_is_multilayer_mahalanobis(net, id_images, test_images) -> None:
    y = labels_of(net, id_images)
    bb = backbone(net, layers=["body.1", "body.3"])
    fit = bb.encode_images(id_images)
    det = fit_detector(create("mds_ensemble", epsilon=0.0), fit, y)
    ml = fit_detector(create("multilayer_mahalanobis"), fit, y)
    close(det.score_images(bb.classifier_parts(), test_images), ml.score(bb.encode_images(test_images)), rtol=1e-5)


def test_mds_ensemble_needs_the_layers_from_the_network(net, id_images) -> None:
    y = labels_of(net, id_images)
    fit = backbone(net, layers=["body.1"]).encode_images(id_images)
    det = fit_detector(create("mds_ensemble"), fit, y)
    with pytest.raises(DetectorError, match="layers"):
        det.score_images(backbone(net).classifier_parts(), id_images[:2])  # parts without layers
    with pytest.raises(DetectorError, match="label"):
        create("mds_ensemble").fit(fit)
    with pytest.raises(DetectorError, match="score_images"):
        det.score(fit)


# =========================================================================== MC Dropout
class LinearDropout(torch.nn.Module):
    """logits = W dropout(h) + b with a fixed 4-d h per image: every mask can be enumerated."""

    def __init__(self, p: float) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.proj = torch.nn.Linear(3 * 2 * 2, 4)
        self.drop = torch.nn.Dropout(p)
        self.fc = torch.nn.Linear(4, 3)
        self.double().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.proj(x.flatten(1))))


def exact_mc_dropout(model: LinearDropout, x: torch.Tensor, p: float) -> dict[str, np.ndarray]:
    """Expectations over all 2^4 masks (keep 1 - p, scale 1 / (1 - p)) of pytorch-ood's statistics."""
    with torch.no_grad():
        h = model.proj(x.flatten(1)).numpy()
    w, b = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    probs, weights = [], []
    for mask in itertools.product([0, 1], repeat=4):
        m = np.array(mask, dtype=float)
        logits = (h * m / (1 - p)) @ w.T + b
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs.append(e / e.sum(axis=1, keepdims=True))
        weights.append(np.prod(np.where(m == 1, 1 - p, p)))
    probs, weights = np.stack(probs), np.array(weights)[:, None, None]
    mean = (weights * probs).sum(axis=0)
    var = (weights * (probs - mean) ** 2).sum(axis=0)
    return {"var": var.mean(axis=1), "mean": 1 - mean.max(axis=1),
            "entropy": -(mean * np.log(mean)).sum(axis=1)}


def parts_of(model: torch.nn.Module) -> ClassifierParts:
    return ClassifierParts(feature_map=lambda x: model.drop(model.proj(x.flatten(1))), pool=lambda h: h,
                           head=model.fc, input_spec=InputSpec(size=2, mean=(0.5,) * 3, std=(0.5,) * 3),
                           network=model)


@pytest.mark.parametrize("mode", ["var", "mean", "entropy"])
def test_mc_dropout_converges_to_the_exact_expectation_over_masks(mode) -> None:
    p = 0.3
    model = LinearDropout(p)
    x = images(5, seed=7)[:, :, :2, :2]
    exact = exact_mc_dropout(model, x, p)[mode]
    ours = create("mc_dropout", samples=4000, mode=mode).score_images(parts_of(model), x)
    # Monte Carlo: 4000 passes, a few standard errors
    np.testing.assert_allclose(ours, exact, rtol=0.1, atol=0.01 * max(1e-3, float(np.abs(exact).max())))
    assert np.ptp(exact) > 0


def test_mc_dropout_is_seeded_and_independent_of_the_batch() -> None:
    model = LinearDropout(0.3)
    x = images(9, seed=8)[:, :, :2, :2]
    det = create("mc_dropout", samples=20)
    base = det.score_images(parts_of(model), x)
    np.testing.assert_array_equal(det.score_images(parts_of(model), x), base)
    np.testing.assert_allclose(det.score_images(parts_of(model), x, batch_size=2), base, rtol=1e-12)
    np.testing.assert_allclose(det.score_images(parts_of(model), x[[4]]), base[[4]], rtol=1e-12)
    assert not np.allclose(create("mc_dropout", samples=20, seed=1).score_images(parts_of(model), x), base)
    assert not model.drop.training  # nothing is left switched on


def test_mc_dropout_refuses_a_network_without_dropout(net) -> None:
    with pytest.raises(DetectorError, match="no dropout"):
        create("mc_dropout").score_images(backbone(net).classifier_parts(), images(2, 0))
    with pytest.raises(DetectorError, match="no dropout"):
        create("mc_dropout").score_images(parts_of(LinearDropout(0.0)), images(2, 0)[:, :, :2, :2])
    no_network = ClassifierParts(feature_map=net.penultimate, pool=lambda h: h, head=net.fc, input_spec=SPEC)
    with pytest.raises(DetectorError, match="network"):
        create("mc_dropout").score_images(no_network, images(2, 0))


def test_mc_dropout_channel_dropout_and_a_torch_classifier() -> None:
    """Dropout2d zeroes whole channels; a TorchClassifier hands its whole model over (dropout included)."""
    net = SmoothCNN(0)
    net.body.append(torch.nn.Dropout2d(0.5))
    parts = backbone(net).classifier_parts()
    assert parts.network is net and dropout_modules(net) == [net.body[4]]
    scores = create("mc_dropout", samples=10).score_images(parts, images(4, 9))
    assert np.isfinite(scores).all() and np.ptp(scores) > 0


def test_efficientnet_lite_exposes_its_head_dropout() -> None:
    from oodscope.backbones.efficientnet import EfficientNetLite, weights_available

    if not weights_available(0):
        pytest.skip("EfficientNet-Lite0 weights are not installed")
    parts = EfficientNetLite(0, device="cpu").classifier_parts()
    drops = dropout_modules(parts.network)
    assert drops == [parts.network._dropout] and drops[0].p == pytest.approx(0.2)


# =========================================================================== fitting through the shared path
def test_feature_fitted_ones_declare_features_and_labels_image_fitted_ones_the_network() -> None:
    for name in ("mahalanobis_odin", "mds_ensemble"):
        needs = create(name).fit_needs()
        assert needs.model and needs.features and needs.labels
    for name in ("adascale_a", "adascale_l", "nac_ue"):
        needs = create(name).fit_needs()
        assert needs.model and not needs.features
        assert create(name).fit_options == ("parts", "images")
    assert create("gram").fit_needs().features and not create("gram").fit_needs().model


def test_fitted_model_detectors_survive_save_and_load(net, id_images, test_images, tmp_path) -> None:
    parts = backbone(net).classifier_parts()
    for name in ("adascale_l", "nac_ue"):
        det = create(name, **({"sig_alpha": 3.0} if name == "nac_ue" else {})).fit(parts=parts, images=id_images)
        det.save(tmp_path / name)
        np.testing.assert_array_equal(load(tmp_path / name).score_images(parts, test_images),
                                      det.score_images(parts, test_images))
