"""OODModel, its heads, predictions and the convenience constructors (fast: tiny models, small data).

Formulas are checked against independent NumPy computations written here: conformal p-values
``(1 + #{cal >= s}) / (n + 1)``, the threshold ``k = ceil((n + 1)(1 - alpha))``, KNN distances, the
linear-probe and zero-shot head probabilities, LAC sets and Benjamini-Hochberg. Real-data guarantees
are in ``test_guarantees_real.py``; the CLI in ``test_cli_fit_score.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_classifier

from oodscope.backbones.base import Features, InputSpec, l2_normalize
from oodscope.calibration.split import split_calibration
from oodscope.io import Relabel, Subset, digits, write_image_folder
from oodscope.pipeline import (
    FewShotDetector,
    OODModel,
    OODModelError,
    ZeroShotDetector,
    ZeroShotHead,
)
from oodscope.pipeline.heads import CONSE_LOGIT_SCALE, DEFAULT_LOGIT_SCALE
from oodscope.text.prompts import TextEmbeddingCache


@pytest.fixture(autouse=True)
def _isolated_text_cache(monkeypatch):
    import oodscope.text.prompts as prompts

    monkeypatch.setattr(prompts, "_DEFAULT_CACHE", TextEmbeddingCache())


class TinyVL:
    """A small deterministic vision-language backbone: image embedding = fixed random projection of the
    4x4-pooled image, L2-normalized; text embedding = a unit vector seeded by the text's SHA-256."""

    def __init__(self, dim: int = 12, seed: int = 0, id: str = "tiny-vl", logit_scale: float | None = 20.0):
        self.proj = np.random.default_rng(seed).standard_normal((48, dim))
        self.id = id
        self.device = "cpu"
        self.input_spec = InputSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        self.logit_scale = logit_scale
        self.dim = dim

    def encode_images(self, batch: torch.Tensor) -> Features:
        pooled = torch.nn.functional.adaptive_avg_pool2d(batch.float(), 4).flatten(1).numpy()
        emb = l2_normalize(pooled @ self.proj).astype(np.float32)
        return Features(embedding=emb, logit_scale=self.logit_scale, backbone_id=self.id)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little"))
                .standard_normal(self.dim) for t in texts]
        return l2_normalize(np.asarray(rows)).astype(np.float32)

    def weights_fingerprint(self) -> str:
        return hashlib.sha256(self.proj.tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- references
def ref_p_values(cal: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.array([(1 + np.sum(cal >= v)) / (len(cal) + 1) for v in s])


def ref_bh(p: np.ndarray, q: float) -> np.ndarray:
    m = len(p)
    order = np.argsort(p)
    passed = [i for i in range(1, m + 1) if p[order[i - 1]] <= q * i / m]
    out = np.zeros(m, dtype=bool)
    if passed:
        out[order[: max(passed)]] = True
    return out


def ref_knn(bank: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.sqrt(((z[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k - 1]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def gaussian_features(rng: np.random.Generator, n_per_class: int, ood: bool = False) -> tuple[Features, np.ndarray]:
    """ID: 3 classes around 4 e_0, 4 e_1, 4 e_2 in 8-d; OOD: one cluster around -6 e_5."""
    centers = np.eye(3, 8) * 4.0
    labels = np.repeat(np.arange(3), n_per_class)
    x = centers[labels] + rng.standard_normal((len(labels), 8))
    if ood:
        x = x - centers[labels] - 6.0 * np.eye(8)[5]
    return Features(embedding=x.astype(np.float32), backbone_id="tiny-vl"), labels


@pytest.fixture
def fitted():
    """KNN (k=3) + linear probe fitted on 3 Gaussian classes, calibrated on 60 held-out rows."""
    rng = np.random.default_rng(0)
    fit_x, fit_y = gaussian_features(rng, 20)
    cal_x, cal_y = gaussian_features(rng, 20)
    model = OODModel(TinyVL(), "knn", {"k": 3}, alpha=0.1, prediction_sets="lac", progress=False)
    model.fit(fit_x, labels=fit_y, classes=["a", "b", "c"], calibration=cal_x, calibration_labels=cal_y)
    test_x, test_y = gaussian_features(rng, 10)
    ood_x, _ = gaussian_features(rng, 5, ood=True)
    return model, fit_x, cal_x, cal_y, Features.concatenate([test_x, ood_x]), test_y


# --------------------------------------------------------------------------- split
def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat([0, 1, 2], [10, 20, 4])
    hashes = [bytes([i]) * 16 for i in range(len(labels))]
    fit, cal = split_calibration(hashes, labels, 0.3, seed=0)
    assert sorted(np.concatenate([fit, cal]).tolist()) == list(range(len(labels)))
    assert [int((labels[cal] == c).sum()) for c in range(3)] == [3, 6, 1]  # round(0.3 * n_c)
    again = split_calibration(hashes, labels, 0.3, seed=0)
    assert np.array_equal(cal, again[1])
    assert not np.array_equal(cal, split_calibration(hashes, labels, 0.3, seed=1)[1])
    with pytest.raises(ValueError, match="calibration_fraction"):
        split_calibration(hashes, labels, 1.0, seed=0)


def test_split_keeps_duplicate_content_on_one_side():
    labels = np.zeros(40, dtype=np.int64)
    hashes = [bytes([i % 10]) * 16 for i in range(40)]  # 10 distinct images, 4 copies each
    for seed in range(5):
        fit, cal = split_calibration(hashes, labels, 0.5, seed=seed)
        assert not {hashes[i] for i in fit} & {hashes[i] for i in cal}
        assert len({hashes[i] for i in cal}) == 5


# --------------------------------------------------------------------------- decisions
def test_p_values_threshold_and_decisions_match_the_formulas(fitted):
    model, fit_x, cal_x, _, test_x, _ = fitted
    bank = fit_x.embedding
    cal_scores = ref_knn(bank, cal_x.embedding, 3)
    preds = model.predict(test_x)
    np.testing.assert_allclose(preds.scores, ref_knn(bank, test_x.embedding, 3), rtol=1e-5)
    np.testing.assert_allclose(model.pvalues_.cal_scores, np.sort(cal_scores), rtol=1e-5)
    cal_sorted = model.pvalues_.cal_scores
    np.testing.assert_allclose(preds.p_values, ref_p_values(cal_sorted, preds.scores))
    n = len(cal_sorted)
    k = math.ceil((n + 1) * 0.9 - 1e-9)
    assert model.threshold.rank == k and model.threshold.value == cal_sorted[k - 1]
    assert np.array_equal(preds.ood, preds.p_values <= 0.1)
    assert np.array_equal(preds.ood, preds.scores > cal_sorted[k - 1])
    assert preds.ood[-15:].all()  # the shifted cluster is far from every ID class
    rows = preds.to_dicts()
    assert rows[0].keys() == {"item", "score", "p_value", "ood", "predicted_class", "class_probability",
                              "prediction_set", "error"}
    assert rows[0]["item"] == "0" and rows[-1]["item"] == str(len(test_x) - 1)


def test_linear_probe_head_and_lac_sets_match_numpy(fitted):
    model, _, cal_x, cal_y, test_x, _ = fitted
    head = model.head_
    def probs(f: Features) -> np.ndarray:
        z = f.embedding / np.linalg.norm(f.embedding, axis=1, keepdims=True)
        return softmax(z @ head.weight.T.astype(np.float64) + head.bias)
    preds = model.predict(test_x)
    np.testing.assert_allclose(preds.probabilities, probs(test_x), rtol=1e-5, atol=1e-9)
    cal_nc = np.sort(1 - probs(cal_x)[np.arange(len(cal_y)), cal_y])
    qhat = cal_nc[math.ceil((len(cal_nc) + 1) * 0.9 - 1e-9) - 1]
    np.testing.assert_allclose(model.set_calibrator_.qhat_, qhat, rtol=1e-6)
    assert np.array_equal(preds.set_mask, 1 - preds.probabilities <= model.set_calibrator_.qhat_)
    for row, mask, ood in zip(preds, preds.set_mask, preds.ood, strict=True):
        expected = [] if ood else [c for c, m in zip(["a", "b", "c"], mask, strict=True) if m]
        assert row.prediction_set == expected  # the rule: no set for an image flagged OOD
        assert row.predicted_class in ("a", "b", "c")


def test_fdr_flags_are_benjamini_hochberg(fitted):
    model, *_, test_x, _ = fitted
    for q in (0.05, 0.2, 0.5):
        preds = model.predict(test_x, fdr=q)
        assert np.array_equal(preds.ood_fdr, ref_bh(preds.p_values, q))
        assert preds.to_dicts()[0]["ood_fdr"] in (True, False)


def test_chunking_and_order_do_not_change_predictions():
    rng = np.random.default_rng(3)
    fit_x, fit_y = gaussian_features(rng, 20)
    cal_x, cal_y = gaussian_features(rng, 20)
    model = OODModel(TinyVL(), "knn", {"k": 3}, alpha=0.1, prediction_sets="aps", progress=False)
    model.fit(fit_x, labels=fit_y, calibration=cal_x, calibration_labels=cal_y)
    test_x, _ = gaussian_features(rng, 15)
    whole = model.predict(test_x)
    chunked = model.predict(test_x, chunk_size=7)
    assert whole.to_dicts() == chunked.to_dicts()
    perm = rng.permutation(len(test_x))
    shuffled = model.predict(test_x.subset(perm))
    assert np.array_equal(shuffled.scores, whole.scores[perm])
    assert np.array_equal(shuffled.set_mask, whole.set_mask[perm])  # randomized APS: per-image uniforms


def test_refuses_to_calibrate_on_the_fit_set(fitted):
    model, fit_x, *_ = fitted
    with pytest.raises(OODModelError, match="overlap"):
        model.calibrate(fit_x)
    rng = np.random.default_rng(9)
    other, _ = gaussian_features(rng, 10)
    mixed = Features.concatenate([other, fit_x.subset([0])])
    with pytest.raises(OODModelError, match="1 item id"):
        model.calibrate(mixed)
    ids = [f"img{i}" for i in range(len(fit_x))]
    m2 = OODModel(TinyVL(), "knn", {"k": 3}, alpha=0.1, progress=False).fit(fit_x, ids=ids)
    with pytest.raises(OODModelError, match="img4"):
        m2.calibrate(other, ids=[f"new{i}" for i in range(len(other) - 1)] + ["img4"])


def test_too_few_calibration_images_is_a_clear_error():
    rng = np.random.default_rng(1)
    fit_x, fit_y = gaussian_features(rng, 10)
    cal_x, _ = gaussian_features(rng, 6)  # 18 < 19 needed for alpha = 0.05
    model = OODModel(TinyVL(), "knn", {"k": 3}, alpha=0.05, progress=False).fit(fit_x, labels=fit_y)
    with pytest.raises(OODModelError, match="at least 19"):
        model.calibrate(cal_x)
    with pytest.raises(OODModelError, match="not calibrated"):
        model.predict(cal_x)


def test_unsupported_methods_and_settings_are_refused():
    with pytest.raises(OODModelError, match="unknown method"):
        OODModel(TinyVL(), "no-such-method")
    with pytest.raises(OODModelError, match="gradients"):
        OODModel(TinyVL(), "odin")
    with pytest.raises(OODModelError, match="adapts to the test stream"):
        OODModel(TinyVL(), "adaneg", {"classes": ["a", "b"]})
    with pytest.raises(OODModelError, match="alpha"):
        OODModel(TinyVL(), "knn", alpha=1.5)
    rng = np.random.default_rng(0)
    x, _ = gaussian_features(rng, 10)
    with pytest.raises(OODModelError, match="class label"):
        OODModel(TinyVL(), "mahalanobis", progress=False).fit(x)


# --------------------------------------------------------------------------- zero-shot
def test_zero_shot_head_uses_the_backbone_logit_scale_and_class_texts():
    backbone = TinyVL(logit_scale=20.0)
    classes = ["cat", "dog", "boat"]
    rng = np.random.default_rng(5)
    cal = Features(embedding=l2_normalize(rng.standard_normal((30, 12))).astype(np.float32), logit_scale=20.0)
    model = OODModel(backbone, "mcm", alpha=0.1, progress=False)
    model.fit(classes=classes)
    assert model.is_fitted and not model.is_calibrated
    scores = model.score(cal)  # zero-shot scores need no calibration
    model.calibrate(cal, labels=rng.integers(0, 3, 30))
    text = l2_normalize(backbone.encode_texts([f"a photo of a {c}." for c in classes]).astype(np.float64))
    expected = softmax(20.0 * cal.embedding.astype(np.float64) @ text.T)
    preds = model.predict(cal)
    np.testing.assert_allclose(preds.probabilities, expected, rtol=1e-5)
    np.testing.assert_allclose(preds.scores, -softmax(cal.embedding @ text.T).max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(scores, preds.scores)
    assert ZeroShotHead.scale_for(None, "conse:effnet-lite0") == CONSE_LOGIT_SCALE
    assert ZeroShotHead.scale_for(None, "hf:x") == DEFAULT_LOGIT_SCALE
    assert ZeroShotHead.scale_for(50.0, "conse:effnet-lite0") == 50.0


def test_few_shot_vision_language_method_gets_images_labels_and_text_encoder():
    from oodscope.detectors import create

    rng = np.random.default_rng(6)
    fit_x, fit_y = gaussian_features(rng, 10)
    cal_x, cal_y = gaussian_features(rng, 10)
    backbone = TinyVL(dim=8)
    model = OODModel(backbone, "gda", alpha=0.1, progress=False)
    assert not model.zero_shot  # GDA learns from labelled images too
    model.fit(fit_x, labels=fit_y, classes=["a", "b", "c"], calibration=cal_x, calibration_labels=cal_y)
    reference = create("gda", classes=["a", "b", "c"]).fit(fit_x, fit_y, text_encoder=backbone)
    np.testing.assert_allclose(model.predict(cal_x).scores, reference.score(cal_x), rtol=1e-6)
    assert model.head_.kind == "linear_probe" and model.fit_ids_


# --------------------------------------------------------------------------- persistence
def test_save_load_round_trip_and_backbone_checks(fitted, tmp_path):
    model, *_, test_x, _ = fitted
    out = model.save(tmp_path / "m")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["calibration.safetensors", "detector/detector.json", "detector/detector.safetensors",
                     "head/head.json", "head/head.safetensors", "model.json"]
    config = json.loads((out / "model.json").read_text())
    assert config["format_version"] == 1 and config["backbone"]["id"] == "tiny-vl"
    assert config["backbone"]["fingerprint"] == TinyVL().weights_fingerprint()
    assert config["threshold"]["value"] == model.threshold.value
    loaded = OODModel.load(out, backbone=TinyVL(), progress=False)
    assert loaded.predict(test_x).to_dicts() == model.predict(test_x).to_dicts()
    with pytest.raises(OODModelError, match="backbone object"):
        OODModel.load(out)
    with pytest.raises(OODModelError, match="fitted on backbone 'tiny-vl'"):
        OODModel.load(out, backbone=TinyVL(id="other-vl"))
    with pytest.raises(OODModelError, match="weights fingerprint"):
        OODModel.load(out, backbone=TinyVL(seed=1))
    config["format_version"] = 99
    (out / "model.json").write_text(json.dumps(config))
    with pytest.raises(OODModelError, match="format version"):
        OODModel.load(out, backbone=TinyVL())


# --------------------------------------------------------------------------- images, user classifier
@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    """3 digit classes x 20 images as an ImageFolder, and a folder to score with 2 bad files."""
    root = tmp_path_factory.mktemp("digits")
    src = digits()
    idx = np.concatenate([np.flatnonzero(src.labels == c)[:26] for c in (0, 1, 7)])
    labels = np.searchsorted([0, 1, 7], src.labels[idx])
    sub = Relabel(Subset(src, idx), labels, ["zero", "one", "seven"])
    fit_rows = np.concatenate([np.arange(26 * c, 26 * c + 20) for c in range(3)])
    id_dir = write_image_folder(sub, root / "id", indices=fit_rows)
    test_rows = np.concatenate([np.arange(26 * c + 20, 26 * c + 26) for c in range(3)])
    score_dir = write_image_folder(Relabel(sub, None), root / "score", indices=test_rows)
    (score_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (score_dir / "text.png").write_text("not an image")
    return id_dir, score_dir


def test_fit_from_an_image_folder_with_a_users_classifier(digit_folders, tmp_path):
    id_dir, score_dir = digit_folders
    model = OODModel(tiny_classifier(), "knn", {"k": 3}, alpha=0.1, cache_dir=tmp_path / "cache",
                     num_workers=0, progress=False)
    model.fit(id_dir, calibration_fraction=0.5)
    assert model.info_["fit"]["n"] + model.info_["calibration"]["n"] == 60
    assert model.info_["calibration"]["n"] == 30 and model.class_names_ == ["one", "seven", "zero"]
    preds = model.predict(score_dir)
    errors = {Path(i).name: e for i, e in preds.failures}
    assert set(errors) == {"broken.png", "text.png"}
    assert preds.ok.sum() == 18 and np.isfinite(preds.scores[preds.ok]).all()
    assert all(r.score is None and r.error for r in preds if Path(r.item_id).name in errors)
    scores = model.score(score_dir)
    assert np.array_equal(np.isnan(scores), ~preds.ok)
    np.testing.assert_allclose(scores[preds.ok], preds.scores[preds.ok])
    # The same content under another name, in a "held-out" folder: refused.
    cal_dir = tmp_path / "cal"
    shutil.copytree(score_dir, cal_dir)
    for bad in ("broken.png", "text.png"):
        (cal_dir / bad).unlink()
    copied = sorted(p for p in (Path(id_dir) / "one").iterdir())
    fit_hashes = {h.hex() for h in model.fit_ids_}
    dup = next(p for p in copied if hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest() in fit_hashes)
    shutil.copy(dup, cal_dir / "renamed_copy.png")
    with pytest.raises(OODModelError, match="renamed_copy.png"):
        model.calibrate(cal_dir)
    out = model.save(tmp_path / "saved")
    again = OODModel.load(out, backbone=tiny_classifier(), cache_dir=tmp_path / "cache", num_workers=0,
                          progress=False)
    assert again.predict(score_dir).to_dicts() == preds.to_dicts()
    impostor = tiny_classifier(seed=1)  # other weights under the same id
    impostor.id = "tiny-cnn-0"
    with pytest.raises(OODModelError, match="weights fingerprint"):
        OODModel.load(out, backbone=impostor)


def test_wrappers_forward_to_oodmodel(digit_folders, tmp_path):
    id_dir, score_dir = digit_folders
    few = FewShotDetector(tiny_classifier(), "knn", alpha=0.1, k=3, progress=False).fit(id_dir)
    preds = few.predict(score_dir)
    assert preds.ok.sum() == 18 and few.classes == ["one", "seven", "zero"]
    np.testing.assert_allclose(few.score(score_dir)[preds.ok], preds.scores[preds.ok])
    few.save(tmp_path / "few")
    with pytest.raises(OODModelError, match="FewShotDetector"):
        ZeroShotDetector.load(tmp_path / "few", backbone=tiny_classifier())
    zs = ZeroShotDetector(TinyVL(), classes=["zero", "one", "seven"], alpha=0.1, progress=False)
    zs.fit(calibration=id_dir)  # 60 ID images calibrate; nothing is fitted on them
    assert zs.model.info_["calibration"]["n"] == 60 and zs.model.set_calibrator_ is not None
    out = zs.predict(score_dir)
    assert out.ok.sum() == 18 and out[0].predicted_class in ("zero", "one", "seven")
    with pytest.raises(OODModelError, match="not a zero-shot"):
        ZeroShotDetector(TinyVL(), classes=["a", "b"], method="knn")
    with pytest.raises(OODModelError, match="is a zero-shot method"):
        FewShotDetector(TinyVL(), method="mcm")


def test_logits_head_is_the_users_classifier_softmax(digit_folders):
    from tiny_models import TinyCNN

    from oodscope.backbones import TorchClassifier
    from oodscope.features.extract import extract
    from oodscope.io import open_dataset

    id_dir, score_dir = digit_folders
    torch.manual_seed(0)
    net = TinyCNN(num_classes=3)
    backbone = TorchClassifier(net, "fc", input_spec=InputSpec(size=32, mean=(0.5,) * 3, std=(0.25,) * 3),
                               id="tiny-3-class", device="cpu")
    model = OODModel(backbone, "energy", head="logits", alpha=0.1, num_workers=0, progress=False).fit(id_dir)
    assert model.head_.kind == "logits"
    preds = model.predict(score_dir)
    logits = extract(backbone, open_dataset(score_dir), num_workers=0, progress=False).features.logits
    logits = logits.astype(np.float64)
    np.testing.assert_allclose(preds.probabilities[preds.ok], softmax(logits), rtol=1e-5)
    np.testing.assert_allclose(preds.scores[preds.ok], -np.log(np.exp(logits).sum(axis=1)), rtol=1e-5)
    wrong = OODModel(tiny_classifier(), "energy", head="logits", alpha=0.1, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="5 logits but 3 class names"):
        wrong.fit(id_dir)
