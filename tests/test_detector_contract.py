"""The detector contract, checked for every registered detector: registering a detector is all it takes.

Each detector is created with its defaults (plus the few required parameters of ``REQUIRED_PARAMS``,
and the ID class names for the kinds built from them, through ``build_detector``), fitted by its kind
with ``fit_detector`` on small real features, and checked for: finite float64 scores of shape (N,),
identical scores after save -> load, parameters untouched by ``fit``, unknown parameters refused at
creation with the valid ones listed, a declared kind and a cited source, ``fit_needs()`` agreeing with
what ``fit`` really needs, and scores that follow the rows (batch order and batch composition do not
matter) for every kind but the test-time-adaptive one. Image anomaly detectors (kind ``anomaly``) are
also checked for their maps: fitted on the dense maps of normal images, ``score_maps`` gives the same
scores as ``score`` and finite float32 maps (N, h, w), identical after save -> load, that follow the rows.

The features are real: scikit-learn's handwritten digits (8x8 scans, shipped with scikit-learn)
through a small CNN (``tiny_models.TinyCNN``) trained here for a few seconds on digits 0-4 and wrapped
as an oodscope backbone (``TorchClassifier``, with patches and two pooled layers); fit images are
digits 0-4, test images are held-out digits 0-4 and digits 5-9. The text encoder maps a prompt naming
an ID class to that class's mean image embedding and any other text to a fixed pseudo-random unit
vector, so zero-shot and few-shot detectors see the image space they are meant for.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from oodscope.backbones import TorchClassifier
from oodscope.backbones.base import ClassifierParts, Features, InputSpec
from oodscope.detectors import Detector, DetectorError, create, load, registered
from oodscope.detectors.base import parameters
from oodscope.detectors.fitting import build_detector, class_needs, fit_detector, fit_problems
from oodscope.detectors.kinds import DetectorKind
from oodscope.text.lexicon import Lexicon
from oodscope.text.prompts import TextEmbeddingCache

NAMES = list(registered())

ID_CLASSES = ["digit zero", "digit one", "digit two", "digit three", "digit four"]
OOD_CLASSES = ["digit five", "digit six", "digit seven", "digit eight", "digit nine"]

# --------------------------------------------------------------------------- the tables
#: Minimal values of the parameters that have no default (the ID class names, ``classes``, are given to
#: every kind that is built from them by ``build_detector``). A new detector with a required parameter
#: must add it here: test_required_parameters_are_in_the_table says so.
REQUIRED_PARAMS: dict[str, dict[str, Any]] = {
    "weighted_energy": {"class_weights": [1.0, 0.5, 2.0, 1.0, 1.5]},
    "eoe": {"outlier_classes": OOD_CLASSES[:3]},
    # An output-based, a label-needing feature-space and a zero-shot member: the ensemble then needs
    # labels and a text encoder too, which its fit_needs() must say.
    "score_ensemble": {"members": [["energy", {}], ["she", {}], ["mcm", {"classes": ID_CLASSES}]]},
    # Not required, but NegLabel's official recipe keeps 15 % of each part of speech: of the fixture's
    # 13-word lexicon that is one noun, far from every image, whose ID mass saturates to 1. Keep them all.
    "neglabel": {"num_negatives": 1.0},
    "csp": {"num_negatives": 1.0},  # as NegLabel (same 15 % rule)
    "negrefine": {"num_negatives": 1.0},
    # Not required: the default CPU schedule (300 steps at 128 px) takes minutes; two steps at 64 px.
    "efficientad": {"image_size": 64, "steps": 2},
}

NEGATIVE_WORDS = (*OOD_CLASSES, "car", "tree", "house", "river", "cloud", "rocky", "wooden", "blue")
#: Options of ``fit`` (a class's ``fit_options``) a detector cannot be fitted without here, by name ->
#: function of the fixture data. NegLabel and AdaNeg mine a small lexicon instead of all of WordNet.
FIT_OPTIONS = {
    "neglabel": lambda data: {"lexicon": data.lexicon},
    "adaneg": lambda data: {"lexicon": data.lexicon},
    "csp": lambda data: {"lexicon": data.lexicon},
    "negrefine": lambda data: {"lexicon": data.lexicon},
    "clipn": lambda data: {"no_text_encoder": data.no_encoder},
    # The texts of the fixture classifier's 5 labels (the encoder has no label_embeddings): two named
    # like ID classes, three unrelated words.
    "label_vocabulary": lambda data: {"label_texts": ["digit zero", "digit one", "car", "tree", "house"]},
    # Model-in-the-loop detectors fitted through the network on the ID fit images.
    "adascale_a": lambda data: {"parts": data.parts, "images": data.fit_images},
    "adascale_l": lambda data: {"parts": data.parts, "images": data.fit_images},
    "nac_ue": lambda data: {"parts": data.parts, "images": data.fit_images},
    # An image anomaly detector that trains its own networks on the normal images.
    "efficientad": lambda data: {"parts": data.parts, "images": data.fit_images},
}

#: Detectors whose scores legitimately depend on the other rows of the batch (test-time-adaptive kinds
#: are exempt by their kind; fit_needs().adaptive).
BATCH_DEPENDENT: dict[str, str] = {}

#: (detector, check) -> reason: a known failure of a detector whose file is being edited elsewhere.
#: Strict: once fixed, the xfail turns into a failure, so the entry is removed.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

#: A paper: a venue and a year, or an arXiv number; or a method of oodscope's own.
CITATION = re.compile(
    r"\b(?:NeurIPS|NIPS|ICLR|ICML|CVPR|ICCV|ECCV|IJCV|TPAMI|AAAI|IJCAI|TMLR|WACV|BMVC|UAI|AISTATS|arXiv)\b"
    r"[^\n]{0,20}?\b(?:19|20)\d\d\b|arXiv:\d{4}\.\d{4,5}|oodscope's own"
)


def cases(check: str) -> list:
    """Registered names, with the known failures of ``check`` marked as strict xfails."""
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(name, check)]))
        if (name, check) in KNOWN_FAILURES else name
        for name in NAMES
    ]


# --------------------------------------------------------------------------- a text encoder
def _pseudo_random_unit(text: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return v / np.linalg.norm(v)


class PrototypeEncoder:
    """``encode_texts``: a prompt naming one of the ``prototypes`` -> that unit vector; any other text ->
    a fixed pseudo-random unit vector (seeded by the text)."""

    def __init__(self, prototypes: dict[str, np.ndarray]) -> None:
        self.prototypes = {k: v / np.linalg.norm(v) for k, v in prototypes.items()}
        self.dim = len(next(iter(self.prototypes.values())))
        digest = hashlib.sha256(repr(sorted((k, tuple(v)) for k, v in self.prototypes.items())).encode())
        self.id = f"contract-prototypes-{digest.hexdigest()[:12]}"

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            named = [c for c in self.prototypes if c in text.lower()]
            rows.append(self.prototypes[named[0]] if len(named) == 1 else _pseudo_random_unit(text, self.dim))
        return np.asarray(rows, dtype=np.float32)


# --------------------------------------------------------------------------- real features
@dataclass
class Data:
    fit: Features
    fit_labels: np.ndarray
    test: Features
    test_images: torch.Tensor
    parts: ClassifierParts
    encoder: PrototypeEncoder
    no_encoder: PrototypeEncoder
    lexicon: Lexicon
    fit_images: torch.Tensor  # the fit rows' normalized images (detectors fitted through the network)


def _preprocess(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """8x8 grey digits in [0, 16] -> (N, 3, size, size), normalized as ``spec`` says."""
    x = torch.from_numpy(images / 16.0).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=spec.size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def data() -> Data:
    from sklearn.datasets import load_digits
    from tiny_models import TinyCNN

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    y = digits.target[order]
    images = digits.images[order]
    id_rows, ood_rows = np.flatnonzero(y < 5), np.flatnonzero(y >= 5)
    train, held_out = id_rows[:400], id_rows[400:430]
    fit_rows, test_rows = train[:150], np.concatenate([held_out, ood_rows[:30]])

    spec = InputSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.manual_seed(0)
    net = TinyCNN(num_classes=5, width=16)
    x, target = _preprocess(images[train], spec), torch.from_numpy(y[train])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), target).backward()
        optimizer.step()
    # After training, so every feature is unchanged (dropout is the identity in eval mode): mc_dropout
    # needs a network with dropout to sample.
    net.body.append(torch.nn.Dropout(0.25))
    backbone = TorchClassifier(net, "fc", feature_map="body", input_spec=spec, id="contract-digits-cnn",
                               class_names=ID_CLASSES, device="cpu", patches=True, layers=["body.1", "body.3"],
                               dense_layers=["body.1", "body.3"])  # (16, 8, 8) and (16, 4, 4) maps
    fit_features = backbone.encode_images(_preprocess(images[fit_rows], spec))
    test_images = _preprocess(images[test_rows], spec)
    test_features = backbone.encode_images(test_images)
    fit_labels = y[fit_rows].astype(np.int64)

    # Class prototypes: mean unit embeddings of fit images (ID) and of OOD images outside the test set.
    # The "no" encoder of CLIPN maps "class k" to the prototype of "the other ID classes".
    proto_rows = np.concatenate([fit_rows, ood_rows[30:]])
    emb = backbone.encode_images(_preprocess(images[proto_rows], spec)).embedding
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    prototypes = {c: emb[y[proto_rows] == k].mean(axis=0) for k, c in enumerate(ID_CLASSES + OOD_CLASSES)}
    others = {c: sum(prototypes[o] for o in ID_CLASSES if o != c) for c in ID_CLASSES}
    return Data(
        fit=fit_features,
        fit_labels=fit_labels,
        test=test_features,
        test_images=test_images,
        parts=backbone.classifier_parts(),
        encoder=PrototypeEncoder(prototypes),
        no_encoder=PrototypeEncoder(others),
        lexicon=Lexicon(NEGATIVE_WORDS, ("noun",) * 10 + ("adj",) * 3),
        fit_images=_preprocess(images[fit_rows], spec),
    )


@pytest.fixture(autouse=True)
def _private_text_cache(monkeypatch):
    import oodscope.text.prompts as prompts

    monkeypatch.setattr(prompts, "_DEFAULT_CACHE", TextEmbeddingCache())


# --------------------------------------------------------------------------- helpers
def make(name: str) -> Detector:
    """The detector with its defaults, the table's required parameters and (if its kind needs them) the classes."""
    return build_detector(name, REQUIRED_PARAMS.get(name), classes=ID_CLASSES)


def fit_options(name: str, data: Data) -> dict[str, Any]:
    return FIT_OPTIONS[name](data) if name in FIT_OPTIONS else {}


def fit(det: Detector, data: Data, **drop: bool) -> Detector:
    """``fit_detector`` with every input there is (the kind takes what it needs); ``drop``: leave one out."""
    return fit_detector(
        det,
        None if drop.get("features") else data.fit,
        None if drop.get("labels") else data.fit_labels,
        text_encoder=None if drop.get("text_encoder") else data.encoder,
        **fit_options(det.name, data),
    )


def scores_of(det: Detector, data: Data, rows: np.ndarray | None = None) -> np.ndarray:
    """Scores of the test images (``rows`` of them, in that order): through the network for model kinds."""
    rows = np.arange(len(data.test)) if rows is None else rows
    if det.fit_needs().model:
        return det.score_images(data.parts, data.test_images[torch.from_numpy(rows)])
    return det.score(data.test.subset(rows))


@dataclass
class Fitted:
    detector: Detector
    params_before: dict[str, Any]


@pytest.fixture(scope="module")
def fitted(data):
    """name -> the detector created by ``make`` and fitted by ``fit`` (once per module), with its
    parameters as they were before the fit."""
    cache: dict[str, Fitted] = {}

    def get(name: str) -> Fitted:
        if name not in cache:
            det = make(name)
            before = copy.deepcopy(det.get_params())
            try:
                fit(det, data)
            except DetectorError as err:
                pytest.fail(f"{name}: fit failed ({err}); if it needs a fit option, add it to FIT_OPTIONS")
            cache[name] = Fitted(det, before)
        return cache[name]

    return get


def fresh_scores(det: Detector, data: Data, rows: np.ndarray | None = None) -> np.ndarray:
    if det.fit_needs().adaptive:
        det.reset()  # a new stream
    return scores_of(det, data, rows)


# --------------------------------------------------------------------------- 1. creation
@pytest.mark.parametrize("name", cases("required_params"))
def test_required_parameters_are_in_the_table(name: str) -> None:
    cls = registered()[name]
    required = [k for k, v in parameters(cls).items() if v is inspect.Parameter.empty]
    given = set(REQUIRED_PARAMS.get(name, {})) | ({"classes"} if class_needs(cls).classes else set())
    missing = [k for k in required if k not in given]
    assert not missing, (
        f"{name} has required parameter(s) {missing}: add minimal values to REQUIRED_PARAMS in "
        f"{__file__.rsplit('/', 1)[-1]}"
    )
    det = make(name)
    assert type(det) is cls and det.name == name


@pytest.mark.parametrize("name", cases("unknown_param"))
def test_unknown_parameter_is_refused_with_the_valid_ones(name: str) -> None:
    valid = parameters(registered()[name])
    for extra in ({}, REQUIRED_PARAMS.get(name, {})):
        with pytest.raises(DetectorError, match="bogus_param") as err:
            create(name, bogus_param=1, **extra)
        message = str(err.value)
        absent = [p for p in valid if not re.search(rf"\b{re.escape(p)}\b", message)]
        assert not absent, f"{name}: the message does not list {absent}: {message}"


# --------------------------------------------------------------------------- 7. declarations
@pytest.mark.parametrize("name", cases("declarations"))
def test_declares_a_kind_and_cites_its_source(name: str) -> None:
    cls = registered()[name]
    assert isinstance(cls.kind, DetectorKind), f"{name}: kind must be a DetectorKind, got {cls.kind!r}"
    docs = (sys.modules[cls.__module__].__doc__ or "") + "\n" + (cls.__doc__ or "")
    assert CITATION.search(docs), (
        f"{name}: the module or class docstring must cite a paper (venue and year, or an arXiv number) "
        "or say the method is oodscope's own"
    )


@pytest.mark.parametrize("name", cases("fit_needs"))
def test_fit_needs_match_what_fit_requires(name: str, data: Data) -> None:
    det = make(name)
    needs = det.fit_needs()
    cls_needs = class_needs(name)
    for field in ("features", "labels", "text_encoder", "classes", "model", "adaptive"):
        # an instance may need more than its class (an ensemble's members), never less
        assert getattr(needs, field) >= getattr(cls_needs, field), f"{name}: instance needs less {field}"
    assert cls_needs.classes == ("classes" in det.get_params()), f"{name}: needs.classes vs a classes parameter"
    assert needs.model == callable(getattr(det, "score_images", None)), f"{name}: needs.model vs score_images"
    assert needs.adaptive == callable(getattr(det, "reset", None)), f"{name}: needs.adaptive vs reset()"
    assert not fit_problems(det, features=True, labels=True, text_encoder=True, classifier=True)

    for field, word in (("features", "features"), ("labels", "label"), ("text_encoder", "text_encoder")):
        problems = fit_problems(det, **{k: k != field for k in ("features", "labels", "text_encoder")})
        if getattr(needs, field) or (field == "features" and needs.images):  # ID fit images: "features" there
            assert problems, f"{name}: fit_problems does not report the missing {field}"
            if getattr(needs, field):  # an image-fitted detector gets its images as fit options, not features
                with pytest.raises(DetectorError, match=word):
                    fit(make(name), data, **{field: True})
        else:
            assert not problems, f"{name}: fit_problems reports {problems} without {field}, which it does not need"
    if needs.model:
        assert fit_problems(det, features=True, labels=True, text_encoder=True, classifier=False)
        with pytest.raises(DetectorError, match="score_images"):
            fit(make(name), data).score(data.test)


# --------------------------------------------------------------------------- 2-5. fit, score, persist
@pytest.mark.parametrize("name", cases("scores"))
def test_fit_by_kind_then_finite_float64_scores(name: str, data: Data, fitted) -> None:
    det = fitted(name).detector
    assert det.is_fitted_ or not det.needs_fit
    scores = fresh_scores(det, data)
    assert scores.shape == (len(data.test),), f"{name}: shape {scores.shape}"
    assert scores.dtype == np.float64, f"{name}: dtype {scores.dtype}"
    assert np.isfinite(scores).all(), f"{name}: non-finite scores {scores[~np.isfinite(scores)]}"
    # not a contract of the detector but of this suite: constant scores would make the checks below vacuous
    assert np.ptp(scores) > 0, f"{name}: every test image gets the same score; the fixture data are too easy"


@pytest.mark.parametrize("name", cases("params_unchanged"))
def test_fit_leaves_the_parameters_unchanged(name: str, fitted) -> None:
    record = fitted(name)
    assert record.detector.get_params() == record.params_before


@pytest.mark.parametrize("name", cases("save_load"))
def test_save_load_gives_identical_scores(name: str, data: Data, fitted, tmp_path) -> None:
    det = fitted(name).detector
    det.save(tmp_path / name)
    again = load(tmp_path / name)
    assert type(again) is type(det)
    assert again.get_params() == det.get_params()
    assert again.is_fitted_ == det.is_fitted_
    np.testing.assert_array_equal(fresh_scores(again, data), fresh_scores(det, data))


# --------------------------------------------------------------------------- 8. rows are independent
def _row_dependent(name: str, det: Detector) -> str | None:
    if det.fit_needs().adaptive:
        return f"{name} is test-time adaptive: its scores depend on the stream by design"
    return BATCH_DEPENDENT.get(name)


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale, err_msg=what)


@pytest.mark.parametrize("name", cases("batch_order"))
def test_permuting_rows_permutes_scores(name: str, data: Data, fitted) -> None:
    det = fitted(name).detector
    if reason := _row_dependent(name, det):
        pytest.skip(reason)
    base = scores_of(det, data)
    perm = np.random.default_rng(1).permutation(len(data.test))
    _close(scores_of(det, data, perm), base[perm], f"{name}: permuted rows")


@pytest.mark.parametrize("name", cases("batch_split"))
def test_scores_do_not_depend_on_the_rest_of_the_batch(name: str, data: Data, fitted) -> None:
    det = fitted(name).detector
    if reason := _row_dependent(name, det):
        pytest.skip(reason)
    base = scores_of(det, data)
    rows = np.arange(len(data.test))
    halves = np.concatenate([scores_of(det, data, rows[:7]), scores_of(det, data, rows[7:])])
    _close(halves, base, f"{name}: scored in two batches")
    _close(scores_of(det, data, rows[3:4]), base[3:4], f"{name}: one image alone")


# --------------------------------------------------------------------------- 9. image anomaly detectors
ANOMALY_NAMES = [name for name in NAMES if registered()[name].kind is DetectorKind.ANOMALY]


def anomaly_cases(check: str) -> list:
    return [case for case in cases(check) if (case.values[0] if hasattr(case, "values") else case) in ANOMALY_NAMES]


def maps_of(det: Detector, data: Data, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(data.test)) if rows is None else rows
    if det.fit_needs().adaptive:
        det.reset()
    if det.fit_needs().model:  # trained on the images themselves (EfficientAD): maps from the images
        return det.score_image_maps(data.parts, data.test_images[torch.from_numpy(rows)])
    return det.score_maps(data.test.subset(rows))


@pytest.mark.parametrize("name", anomaly_cases("maps"))
def test_anomaly_maps_are_finite_and_agree_with_the_scores(name: str, data: Data, fitted) -> None:
    from oodscope.detectors._anomaly import AnomalyDetector, upsample_maps

    det = fitted(name).detector
    assert isinstance(det, AnomalyDetector), f"{name}: an anomaly detector subclasses AnomalyDetector"
    assert not det.fit_needs().labels, f"{name}: anomaly detectors fit on normal images, never on labels"
    assert "dense" in det.fields() or det.fit_needs().model, f"{name}: reads {det.fields()}, not the dense maps"
    scores, maps = maps_of(det, data)
    n = len(data.test)
    assert scores.shape == (n,) and scores.dtype == np.float64, f"{name}: scores {scores.shape} {scores.dtype}"
    assert maps.ndim == 3 and len(maps) == n and maps.dtype == np.float32, f"{name}: maps {maps.shape} {maps.dtype}"
    assert min(maps.shape[1:]) >= 1
    assert np.isfinite(maps).all(), f"{name}: non-finite map values"
    _close(scores, fresh_scores(det, data), f"{name}: score_maps scores vs score()")
    # not a contract of the detector but of this suite: maps that are one constant say nothing
    assert np.ptp(maps) > 0, f"{name}: every map cell of every image is the same"
    big = upsample_maps(maps, (16, 16))
    assert big.shape == (n, 16, 16) and np.isfinite(big).all()


@pytest.mark.parametrize("name", anomaly_cases("maps_save_load"))
def test_anomaly_save_load_gives_identical_maps(name: str, data: Data, fitted, tmp_path) -> None:
    det = fitted(name).detector
    det.save(tmp_path / name)
    again = load(tmp_path / name)
    s1, m1 = maps_of(det, data)
    s2, m2 = maps_of(again, data)
    np.testing.assert_array_equal(s2, s1)
    np.testing.assert_array_equal(m2, m1)


@pytest.mark.parametrize("name", anomaly_cases("maps_rows"))
def test_anomaly_maps_follow_the_rows(name: str, data: Data, fitted) -> None:
    det = fitted(name).detector
    if reason := _row_dependent(name, det):
        pytest.skip(reason)
    scores, maps = maps_of(det, data)
    perm = np.random.default_rng(2).permutation(len(data.test))
    p_scores, p_maps = maps_of(det, data, perm)
    _close(p_scores, scores[perm], f"{name}: permuted rows (scores)")
    _close(p_maps, maps[perm], f"{name}: permuted rows (maps)")
    rows = np.arange(len(data.test))
    halves = [maps_of(det, data, rows[:7])[1], maps_of(det, data, rows[7:])[1]]
    _close(np.concatenate(halves), maps, f"{name}: maps scored in two batches")
    _close(maps_of(det, data, rows[3:4])[1], maps[3:4], f"{name}: the map of one image alone")
