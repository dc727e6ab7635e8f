"""oodscope's detectors against pytorch-ood 0.4.0 on real EfficientNet-Lite0 features.

Both libraries score higher = more OOD. For every method both have, the two score vectors on the
same real features (Fashion-MNIST ID, scikit-learn digits OOD, through oodscope's own extraction at
112 px) must be equal (``assert_exact``: to float32 round-off) or, where pytorch-ood applies a
monotone transform, equal after undoing it (the test names it) and with identical ranks
(``assert_ranked``: Spearman = 1, identical rank vectors).

The head is a 20-class sub-head of the ImageNet classifier (the ImageNet classes the fit images are
most often predicted as), so that label-based methods (SHE, OpenMax) see every class predicted
correctly at least once; the labels of Mahalanobis / RMD are the Fashion-MNIST ID classes.

pytorch-ood imports torchvision at import time (its data sets and models); torchvision is not an
oodscope dependency and none of the detector code below calls it, so ``ptood`` imports pytorch-ood
with throw-away ``torchvision`` modules in ``sys.modules`` and removes them right after the import.

Compared: MSP, MaxLogit, Energy, Entropy, GEN, KL matching, ASH-P/B/S, SCALE, ReAct, DICE, ViM,
Mahalanobis, RMD, KNN, SHE, NNGuide, fDBD, NCI, pNML, OpenMax, and through the network ODIN,
GradNorm and RankFeat (16 or 32 of the test images, on a second backbone instance: the first one's
network was built inside extraction's ``torch.inference_mode`` and cannot be backpropagated through).
Transforms: GEN (mean instead of sum: x M), Mahalanobis / RMD (covariance not divided by N: x 2N,
x N), GradNorm (mean instead of sum over the classes: x C), KNN (ranks only).

Not compared (reason): Gram, NAC-UE, Mahalanobis+ODIN, MultiMahalanobis (pytorch-ood fits them from a
data loader through an ``nn.Module``; oodscope's are checked against ports of the official code in
tests/test_detectors_model_*.py); MC dropout (the dropout masks come from different random streams:
oodscope draws one seeded mask per pass, pytorch-ood the global RNG); MCM (zero-shot, needs a text
encoder); GMM (different models: pytorch-ood one Gaussian per class with its own covariance, oodscope
a scikit-learn mixture on PCA features); VRA (pytorch-ood 0.4's VRA clips activations to a
[lower, upper] percentile band, oodscope's ``vra`` is the paper's VRA/VRA+); LTS, WeightedEBO,
GradUncertainty, TemperatureScaling (no oodscope method of the same definition). oodscope's WeiPer,
ViM-residual, Relation and AdaSCALE have no pytorch-ood counterpart.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr

from oodscope.detectors import create

pytestmark = pytest.mark.slow

K_CLASSES = 20


# --------------------------------------------------------------------------- pytorch-ood import
class _Placeholder:
    """Stands in for any torchvision class or function at import time (base class, default value)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs):
        return self


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Placeholder,), {})
        setattr(self, name, value)
        return value


class _TorchvisionFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


def _import_pytorch_ood():
    if importlib.util.find_spec("pytorch_ood") is None:
        pytest.skip("pytorch-ood is not installed (pip install --no-deps pytorch-ood==0.4.0)")
    if importlib.util.find_spec("torchvision") is not None:  # the real one: nothing to stand in for
        import pytorch_ood.detector

        return pytorch_ood.detector
    finder = _TorchvisionFinder()
    sys.meta_path.insert(0, finder)
    try:
        import pytorch_ood.detector
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    return pytorch_ood.detector


@pytest.fixture(scope="module")
def ptood():
    return _import_pytorch_ood()


# --------------------------------------------------------------------------- real features
@dataclass
class Real:
    fit: dict[str, torch.Tensor]  # penultimate, logits, weight, bias (float32)
    fit_labels: torch.Tensor  # Fashion-MNIST ID classes 0..5
    fit_pred: torch.Tensor  # predicted sub-head class 0..K-1
    test: dict[str, torch.Tensor]
    head: torch.nn.Linear
    parts: object  # ClassifierParts of the backbone with the sub-head
    images: torch.Tensor  # 16 ID + 16 OOD test images, normalized (for the methods run through the network)


@pytest.fixture(scope="module")
def real(effnet_lite0) -> Real:
    from oodscope.backbones import create as create_backbone
    from oodscope.features.extract import extract
    from oodscope.io import Subset, digits, fashion_mnist_ood

    backbone = create_backbone("effnet-lite0@112", device="cpu")
    train = fashion_mnist_ood("train", per_class=25)  # 150 ID fit images
    test = fashion_mnist_ood("test", per_class=10)  # 60 ID test images
    ood = Subset(digits(), np.arange(60))  # 60 OOD test images
    fit = extract(backbone, train.id, num_workers=0, progress=False)
    test_id = extract(backbone, test.id, num_workers=0, progress=False)
    test_ood = extract(backbone, ood, num_workers=0, progress=False)
    assert not fit.failures and not test_id.failures and not test_ood.failures

    w_full = torch.as_tensor(np.asarray(fit.features.weight), dtype=torch.float32)
    b_full = torch.as_tensor(np.asarray(fit.features.bias), dtype=torch.float32)
    pen_fit = torch.as_tensor(np.asarray(fit.features.penultimate), dtype=torch.float32)
    pen_test = torch.as_tensor(
        np.concatenate([test_id.features.penultimate, test_ood.features.penultimate]), dtype=torch.float32
    )
    # The ImageNet classes the fit images are most often predicted as: a head under which every class
    # of the sub-head is predicted for some fit image.
    counts = torch.bincount((pen_fit @ w_full.T + b_full).argmax(1), minlength=w_full.shape[0])
    keep = torch.argsort(counts, descending=True, stable=True)[:K_CLASSES]
    head = torch.nn.Linear(w_full.shape[1], K_CLASSES)
    with torch.no_grad():
        head.weight.copy_(w_full[keep])
        head.bias.copy_(b_full[keep])
    head.requires_grad_(False).eval()

    # embedding: the 64 units of largest variance on the fit images, where 150 images give a full-rank
    # covariance (Mahalanobis, RMD); on all 1280 units (or units that are almost constant) the covariance
    # is singular and pytorch-ood's inverse (with a 1e-6 ridge) and oodscope's pseudo-inverse differ.
    units = torch.argsort(pen_fit.var(0), descending=True)[:64]

    def fields(pen: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"penultimate": pen, "embedding": pen[:, units].contiguous(), "logits": head(pen),
                "weight": head.weight.clone(), "bias": head.bias.clone()}

    from dataclasses import replace

    from oodscope.backbones.preprocess import normalize_batch, prepare_pixels

    def pixels(source, rows) -> np.ndarray:
        return np.stack([prepare_pixels(source.decode(i, source.read(i)), backbone.input_spec) for i in rows])

    images = normalize_batch(np.concatenate([pixels(test.id, range(0, 60, 4)), pixels(ood, range(16))]),
                             backbone.input_spec).contiguous()
    # A second instance for gradients: the first one's network was built inside extraction's
    # torch.inference_mode, and inference tensors cannot be saved for backward.
    network_backbone = create_backbone("effnet-lite0@112", device="cpu")
    parts = replace(network_backbone.classifier_parts(), head=head, network=None, layers=None)

    fit_fields = fields(pen_fit)
    pred = fit_fields["logits"].argmax(1)
    assert len(torch.unique(pred)) == K_CLASSES, "some sub-head class is never predicted on the fit images"
    return Real(fit=fit_fields, fit_labels=torch.as_tensor(fit.labels, dtype=torch.int64), fit_pred=pred,
                test=fields(pen_test), head=head, parts=parts, images=images)


def ours(name: str, real: Real, labels: torch.Tensor | None = None, **params) -> np.ndarray:
    det = create(name, **params)
    if det.fit_needs().features:
        det.fit({k: v.numpy() for k, v in real.fit.items()}, None if labels is None else labels.numpy())
    return det.score({k: v.numpy() for k, v in real.test.items()})


def _maps(pen: torch.Tensor) -> torch.Tensor:
    """Pooled features as 1 x 1 feature maps, the form pytorch-ood's shaping methods take."""
    return pen[:, :, None, None]


def _head_on_maps(head: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda maps: head(maps.flatten(1))


def assert_exact(got: np.ndarray, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    ref = ref.detach().double().numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * max(1.0, float(np.abs(ref).max())))


def assert_ranked(got: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.detach().double().numpy()
    assert got.shape == ref.shape
    rho = spearmanr(got, ref).statistic
    assert rho > 1 - 1e-9, f"Spearman {rho}"
    np.testing.assert_array_equal(rankdata(got), rankdata(ref))


# --------------------------------------------------------------------------- logit methods
def test_logit_methods_equal(ptood, real: Real) -> None:
    logits = real.test["logits"]
    assert_exact(ours("msp", real), ptood.MaxSoftmax(None).predict_logits(logits))
    assert_exact(ours("max_logit", real), ptood.MaxLogit(None).predict_logits(logits))
    assert_exact(ours("energy", real), ptood.EnergyBased(None).predict_logits(logits))
    assert_exact(ours("energy", real, temperature=2.0), ptood.EnergyBased(None, t=2.0).predict_logits(logits))
    assert_exact(ours("entropy", real), ptood.Entropy(None).predict_logits(logits))
    # GEN: pytorch-ood averages over the top-M probabilities (a factor 1/M), the official code sums them;
    # and it clamps probabilities to [1e-7, 1 - 1e-7].
    # Compared on the images whose top-10 probabilities are all inside the clamp (most of them).
    gen = ptood.GEN(None, gamma=0.1, M=10).predict_logits(logits)
    top = logits.softmax(1).topk(10, dim=1).values
    inside = ((top > 1e-7) & (top < 1 - 1e-7)).all(1)
    assert inside.sum() >= 60
    assert_exact(ours("gen", real, M=10)[inside.numpy()], 10 * gen[inside])


def test_kl_matching_equal(ptood, real: Real) -> None:
    ref = ptood.KLMatching(None).fit_logits(real.fit["logits"])
    assert_exact(ours("kl_matching", real), ref.predict_logits(real.test["logits"]))


# --------------------------------------------------------------------------- activation shaping
@pytest.mark.parametrize(("name", "variant"), [("ash_p", "ash-p"), ("ash_b", "ash-b"), ("ash_s", "ash-s")])
def test_ash_equal(ptood, real: Real, name: str, variant: str) -> None:
    ref = ptood.ASH(backbone=None, head=_head_on_maps(real.head), variant=variant, percentile=0.9)
    assert_exact(ours(name, real, percentile=90.0), ref.predict_feature_maps(_maps(real.test["penultimate"])))


def test_scale_equal(ptood, real: Real) -> None:
    ref = ptood.SCALE(backbone=None, head=_head_on_maps(real.head), percentile=0.85)
    assert_exact(ours("scale", real, percentile=85.0), ref.predict_feature_maps(_maps(real.test["penultimate"])))


def test_react_equal(ptood, real: Real) -> None:
    ref = ptood.ReAct(backbone=None, head=_head_on_maps(real.head), percentile=0.9)
    ref.fit_feature_maps(_maps(real.fit["penultimate"]), real.fit_labels)
    assert_exact(ours("react", real, percentile=90.0), ref.predict_feature_maps(_maps(real.test["penultimate"])))


def test_dice_equal(ptood, real: Real) -> None:
    ref = ptood.DICE(None, w=real.head.weight, b=real.head.bias, p=0.9)
    ref.fit_features(real.fit["penultimate"], real.fit_labels)
    assert_exact(ours("dice", real, p=90.0), ref.predict_features(real.test["penultimate"]))


# --------------------------------------------------------------------------- feature-space methods
def test_vim_equal(ptood, real: Real) -> None:
    ref = ptood.ViM(None, d=64, w=real.head.weight, b=real.head.bias)
    ref.fit_features(real.fit["penultimate"], real.fit_labels)
    assert_exact(ours("vim", real, dim=64), ref.predict_features(real.test["penultimate"]), rtol=1e-3)


@contextmanager
def float64():
    """pytorch-ood's Gaussian methods allocate their means and covariances in the default dtype; in
    float32 the inverse of the (ill-conditioned) covariance of real features loses the ranking."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def test_mahalanobis_equal(ptood, real: Real) -> None:
    with float64():
        ref = ptood.Mahalanobis(None).fit_features(real.fit["embedding"].double(), real.fit_labels)
        ref = ref.predict_features(real.test["embedding"].double())
    # pytorch-ood: half the squared distance to the closest class centre, with the covariance not divided
    # by N (its precision is N times smaller); oodscope: the squared distance. A factor 2 N.
    got = ours("mahalanobis", real, labels=real.fit_labels, feature="embedding")
    assert_exact(got, 2 * len(real.fit_labels) * ref)
    assert_ranked(got, ref)


def test_rmd_equal(ptood, real: Real) -> None:
    with float64():
        ref = ptood.RMD(None).fit_features(real.fit["embedding"].double(), real.fit_labels)
        ref = ref.predict_features(real.test["embedding"].double())
    # Both covariances are not divided by N in pytorch-ood: a factor N.
    got = ours("relative_mahalanobis", real, labels=real.fit_labels, feature="embedding")
    assert_exact(got, len(real.fit_labels) * ref)
    assert_ranked(got, ref)


def test_knn_equal(ptood, real: Real) -> None:
    ref = ptood.KNN(None, k=5).fit_features(real.fit["penultimate"], real.fit_labels)
    got = ours("knn", real, k=5, feature="penultimate")
    assert_ranked(got, ref.predict_features(real.test["penultimate"]))


def test_she_equal(ptood, real: Real) -> None:
    ref = ptood.SHE(None, real.head).fit_features(real.fit["penultimate"], real.fit_pred)
    assert_exact(ours("she", real, labels=real.fit_pred), ref.predict_features(real.test["penultimate"]))


def test_nnguide_equal(ptood, real: Real) -> None:
    ref = ptood.NNGuide(None, real.head, k=10).fit_features(real.fit["penultimate"], real.fit_labels)
    assert_exact(ours("nnguide", real, k=10), ref.predict_features(real.test["penultimate"]))


def test_fdbd_equal(ptood, real: Real) -> None:
    ref = ptood.fDBD(None, real.head).fit_features(real.fit["penultimate"])
    assert_exact(ours("fdbd", real), ref.predict_features(real.test["penultimate"]))


def test_nci_equal(ptood, real: Real) -> None:
    ref = ptood.NCI(None, real.head, alpha=1e-4).fit_features(real.fit["penultimate"])
    assert_exact(ours("nci", real, alpha=1e-4), ref.predict_features(real.test["penultimate"]))


def test_pnml_equal(ptood, real: Real) -> None:
    ref = ptood.PNML(None, real.head).fit_features(real.fit["penultimate"], real.fit_labels)
    assert_exact(ours("pnml", real), ref.predict_features(real.test["penultimate"]))


def test_openmax_equal(ptood, real: Real) -> None:
    # alpha = 1: pytorch-ood computes the distance to a class centre only for classes some image of the
    # batch is predicted as (0 for the others), oodscope (as OSDN's compute_openmax) for every top-alpha
    # class; with alpha = 1 only the predicted class is revised and the two coincide.
    ref = ptood.OpenMax(None, tailsize=20, alpha=1, euclid_weight=1.0)
    ref.fit_logits(real.fit["logits"], real.fit_pred)
    got = ours("openmax", real, labels=real.fit_pred, tailsize=20, alpha=1)
    assert_exact(got, ref.predict_logits(real.test["logits"]))


# --------------------------------------------------------------------------- through the network
class _Network(torch.nn.Module):
    """The classifier as one module (feature map -> pool -> sub-head), what pytorch-ood backpropagates."""

    def __init__(self, parts) -> None:
        super().__init__()
        self.parts = parts
        self.head = parts.head  # a sub-module, so that its weight is a named parameter ("head.weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.parts.pool(self.parts.feature_map(x)))


@pytest.mark.parametrize(("temperature", "epsilon"), [(1000.0, 0.0014), (1.0, 0.004)])
def test_odin_equal(ptood, real: Real, temperature: float, epsilon: float) -> None:
    # Both step eps * sign(grad) / std in normalized space (std from the backbone's input spec).
    images = real.images[::2]  # 8 ID + 8 OOD: forward + backward twice per library
    ref = ptood.ODIN(_Network(real.parts), eps=epsilon, temperature=temperature,
                     norm_std=list(real.parts.input_spec.std)).predict(images)
    got = create("odin", temperature=temperature, epsilon=epsilon).score_images(real.parts, images)
    assert_exact(got, ref, rtol=1e-5)
    assert_ranked(got, ref)
    # The perturbation matters at this tolerance, so the comparison covers the gradient step.
    plain = create("odin", temperature=temperature, epsilon=0.0).score_images(real.parts, images)
    assert np.abs(plain - got).max() > 100 * 1e-5 * np.abs(got).max()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradnorm_equal(ptood, real: Real, temperature: float) -> None:
    # pytorch-ood backpropagates per image (torch.func) to the head weight; oodscope uses the closed form
    # ||C p - 1||_1 ||h||_1 / T. pytorch-ood averages the uniform cross-entropy over the classes where
    # the official code sums: a factor C.
    images = real.images[::2]
    with torch.enable_grad():
        ref = ptood.GradNorm(_Network(real.parts), param_filter=lambda name: name == "head.weight",
                             temperature=temperature).predict(images)
    got = create("gradnorm", temperature=temperature).score_images(real.parts, images)
    assert_exact(got, K_CLASSES * ref)


def test_rankfeat_equal(ptood, real: Real) -> None:
    # Both remove the rank-1 part of each (C, H*W) feature map (full SVD) and score the energy.
    ref = ptood.RankFeat(backbone=None, head=lambda maps: real.parts.head(real.parts.pool(maps)))
    with torch.no_grad():
        ref = ref.predict_feature_maps(real.parts.feature_map(real.images))
    got = create("rankfeat", method="svd").score_images(real.parts, real.images)
    assert_exact(got, ref)
