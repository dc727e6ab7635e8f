"""Robustness audits: prompt sensitivity and corruption robustness, checked against independent NumPy
computations of MCM, AUROC and FPR@95 on tiny hand-made inputs; persistence, plots and the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from oodscope.backbones.base import Features
from oodscope.detectors.kinds import FitNeeds
from oodscope.evaluation import audit as A
from oodscope.evaluation.audit import (
    CorruptionAuditResult,
    PromptAuditResult,
    PromptVariant,
    corruption_robustness,
    load_audit,
    plot_corruption_curves,
    plot_prompt_sensitivity,
    prompt_sensitivity,
    prompt_variants,
)
from oodscope.evaluation.audit._common import pair_metrics
from oodscope.evaluation.corruptions import CorruptedSource
from oodscope.features.extract import extract
from oodscope.io import ArrayDataset
from oodscope.text.prompts import TextEmbeddingCache

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ independent references
def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def ref_auroc(s_id: np.ndarray, s_ood: np.ndarray) -> float:
    diff = np.asarray(s_ood)[:, None] - np.asarray(s_id)[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def ref_fpr95(s_id: np.ndarray, s_ood: np.ndarray) -> float:
    threshold = np.sort(s_id)[int(np.ceil(0.95 * len(s_id))) - 1]
    return float(np.mean(np.asarray(s_ood) <= threshold))


def ref_mcm(x: np.ndarray, text: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = unit(x) @ unit(text).T / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return -(p / p.sum(axis=1, keepdims=True)).max(axis=1)


# --------------------------------------------------------------------------------- prompt audit
E = np.eye(4)
TEXTS = {
    # "a sharp photo of a {}." points exactly at the ID clusters: the best phrasing by construction
    "a sharp photo of a cat.": E[0], "a sharp photo of a dog.": E[1],
    # the baseline's class texts lean towards the OOD directions e2 / e3; the bare names point at them
    "a photo of a cat.": E[0] + 0.7 * E[2], "a photo of a dog.": E[1] + 0.7 * E[3],
    "cat": 0.3 * E[0] + E[2], "dog": 0.3 * E[1] + E[3],
    "a photo of a kitten.": E[0] + 0.3 * E[2],
}


class DictEncoder:
    """Embeds only the texts it knows (a KeyError shows any prompt the audit was not meant to build)."""

    def __init__(self) -> None:
        self.id = "dict-encoder"
        self.seen: list[str] = []
        self.calls = 0

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.seen.extend(texts)
        return np.asarray([unit(TEXTS[t]) for t in texts], dtype=np.float32)


def _prompt_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], 30)
    id_x = E[labels] + 0.45 * rng.standard_normal((60, 4))
    near = 0.5 * E[rng.integers(0, 2, 40)] + E[2] + 0.45 * rng.standard_normal((40, 4))
    far = E[3] + 0.5 * E[2] + 0.45 * rng.standard_normal((50, 4))
    return id_x.astype(np.float32), labels, {"near": near.astype(np.float32), "far": far.astype(np.float32)}


VARIANTS = [
    PromptVariant("baseline", "baseline", "a photo of a {}.", ("a photo of a {}.",)),
    PromptVariant("sharp", "context", "a sharp photo of a {}.", ("a sharp photo of a {}.",)),
    PromptVariant("bare", "context", "{}", ("{}",)),
    PromptVariant("kitten", "class_name", "cat->kitten", ("a photo of a {}.",), {"cat": ("kitten",)}),
    PromptVariant("ens", "ensemble", "two names", ("a photo of a {}.",), {"cat": ("cat", "kitten")}),
]


def _variant_text(v: PromptVariant) -> np.ndarray:
    rows = []
    for c in ("cat", "dog"):
        vecs = [unit(TEXTS[t.format(n)]) for n in v.names.get(c, (c,)) for t in v.templates]
        rows.append(unit(np.mean(vecs, axis=0)))  # the prompt ensemble: mean of unit vectors, normalized
    return np.asarray(rows)


def test_prompt_audit_matches_numpy_and_ranks_the_constructed_best_prompt() -> None:
    id_x, labels, ood = _prompt_data()
    encoder = DictEncoder()
    result = prompt_sensitivity(
        None, Features(embedding=id_x), {k: Features(embedding=v) for k, v in ood.items()}, ["cat", "dog"],
        variants=VARIANTS, text_encoder=encoder, text_cache=TextEmbeddingCache(), id_labels=labels, progress=False,
    )
    assert isinstance(result, PromptAuditResult)
    assert result.n_id == 60 and result.n_ood == {"near": 40, "far": 50}
    assert len(result.rows) == len(VARIANTS) * 2
    expected: dict[str, dict[str, float]] = {"near": {}, "far": {}}
    for v in VARIANTS:
        text = _variant_text(v)
        s_id = ref_mcm(id_x, text)
        for name, x in ood.items():
            s_ood = ref_mcm(x, text)
            row = next(r for r in result.rows if r["variant"] == v.id and r["ood_set"] == name)
            assert row["auroc"] == pytest.approx(ref_auroc(s_id, s_ood), abs=1e-9)
            assert row["fpr95"] == pytest.approx(ref_fpr95(s_id, s_ood), abs=1e-9)
            expected[name][v.id] = ref_auroc(s_id, s_ood)
        acc = np.mean((unit(id_x) @ text.T).argmax(axis=1) == labels)
        assert result.variant(v.id)["id_accuracy"] == pytest.approx(acc)
    # the construction works (checked on the reference) and the audit finds it
    for name in ("near", "far"):
        values = np.array(list(expected[name].values()))
        assert max(expected[name], key=expected[name].get) == "sharp"
        assert min(expected[name], key=expected[name].get) == "bare"
        s = result.summary[name]["auroc"]
        assert s["best"] == "sharp" and s["worst"] == "bare"
        assert s["spread"] == pytest.approx(values.max() - values.min(), abs=1e-9)
        assert s["spread"] > 0.05
        assert s["std"] == pytest.approx(values.std(), abs=1e-9)
        assert s["median"] == pytest.approx(np.median(values), abs=1e-9)
        assert result.summary[name]["baseline_auroc"] == pytest.approx(expected[name]["baseline"], abs=1e-9)
        fprs = {r["variant"]: r["fpr95"] for r in result.rows if r["ood_set"] == name}
        f = result.summary[name]["fpr95"]
        assert f["min"] == min(fprs.values()) and f["max"] == max(fprs.values())
        assert fprs[f["best"]] == f["min"] and fprs[f["worst"]] == f["max"]
    mean = {v: (expected["near"][v] + expected["far"][v]) / 2 for v in expected["near"]}
    assert result.summary["mean"]["auroc"]["best"] == max(mean, key=mean.get)
    assert result.summary["mean"]["auroc"]["spread"] == pytest.approx(max(mean.values()) - min(mean.values()))
    # only the text side is encoded, each distinct prompt text once, in one call
    assert sorted(set(encoder.seen)) == sorted(encoder.seen) and encoder.calls == 1


def test_prompt_audit_does_not_depend_on_the_order_of_images() -> None:
    id_x, labels, ood = _prompt_data(1)
    args = dict(variants=VARIANTS[:3], text_encoder=DictEncoder(), progress=False)
    a = prompt_sensitivity(None, Features(embedding=id_x), {"near": Features(embedding=ood["near"])}, ["cat", "dog"],
                           **args)
    perm = np.random.default_rng(0).permutation(len(id_x))
    b = prompt_sensitivity(None, Features(embedding=id_x[perm]), {"near": Features(embedding=ood["near"][::-1])},
                           ["cat", "dog"], **args)
    assert [r["auroc"] for r in a.rows] == pytest.approx([r["auroc"] for r in b.rows], abs=1e-12)


def test_prompt_audit_argument_checks() -> None:
    id_x, _, ood = _prompt_data()
    feats = Features(embedding=id_x)
    with pytest.raises(ValueError, match="zero-shot"):
        prompt_sensitivity(None, feats, {"x": feats}, ["cat", "dog"], method="msp", text_encoder=DictEncoder())
    with pytest.raises(ValueError, match="reserved"):
        prompt_sensitivity(None, feats, {"mean": feats}, ["cat", "dog"], variants=VARIANTS, text_encoder=DictEncoder())
    with pytest.raises(ValueError, match="per variant"):
        prompt_sensitivity(None, feats, {"x": feats}, ["cat", "dog"], text_encoder=DictEncoder(),
                           method_params={"templates": "simple"})
    with pytest.raises(TypeError, match="encode_texts"):
        prompt_sensitivity(None, feats, {"x": feats}, ["cat", "dog"])


def test_prompt_variants_cover_the_kinds_and_are_unique() -> None:
    variants = prompt_variants(["cat", "dog"], domain="animal", synonyms={"cat": ["kitten", "kitty"]}, wordnet=False)
    kinds = {v.kind for v in variants}
    assert kinds == {"baseline", "template", "context", "class_name", "ensemble"}
    assert variants[0].id == "baseline" and variants[0].prompts(["cat"]) == {"cat": ["a photo of a cat."]}
    ids = [v.id for v in variants]
    assert len(set(ids)) == len(ids)
    texts = [json.dumps(v.prompts(["cat", "dog"]), sort_keys=True) for v in variants]
    assert len(set(texts)) == len(texts)
    name1 = next(v for v in variants if v.id == "name-1")
    assert name1.prompts(["cat", "dog"]) == {"cat": ["a photo of a kitten."], "dog": ["a photo of a dog."]}
    name_all = next(v for v in variants if v.id == "name-all")
    expected = ["a photo of a cat.", "a photo of a kitten.", "a photo of a kitty."]
    assert name_all.prompts(["cat", "dog"])["cat"] == expected
    assert any(v.prompts(["cat"])["cat"] == ["a product photo of a cat, a type of animal."] for v in variants)
    assert any(v.prompts(["cat"])["cat"] == ["cat"] for v in variants)  # context removed entirely
    assert PromptVariant.from_dict(name1.to_dict()) == name1
    with pytest.raises(ValueError, match="unknown classes"):
        prompt_variants(["cat"], synonyms={"cow": ["cattle"]})


def test_wordnet_synonyms(tmp_path: Path) -> None:
    # without WordNet files: the ImageNet synset that contains the name (packaged with oodscope)
    assert A.wordnet_synonyms("T-shirt/top", directory=tmp_path) == ["T-shirt", "top", "jersey", "tee shirt"]
    # a tiny WordNet in the real file format: "sneaker" -> the shoe sense, not the person
    data = [
        "10091012 18 n 02 sneak 0 sneaker 0 000 | someone who sneaks",
        "03472535 06 n 03 gym_shoe 0 sneaker 0 tennis_shoe 0 000 | a canvas shoe",
    ]
    text, offsets = "", []
    for line in data:
        offsets.append(len(text.encode()))
        text += line + "\n"
    # offsets inside the lines are placeholders; the reader seeks to the index's offsets
    (tmp_path / "data.noun").write_text(text)
    (tmp_path / "index.noun").write_text(f"sneaker n 2 1 @ 2 1 {offsets[0]:08d} {offsets[1]:08d}\n")
    assert A.wordnet_synonyms("Sneaker", directory=tmp_path) == ["gym shoe", "tennis shoe"]
    assert A.wordnet_synonyms("Sneaker", directory=tmp_path, categories=("noun.person",)) == ["sneak"]


# ----------------------------------------------------------------------------- persistence, plots
def _prompt_result() -> PromptAuditResult:
    id_x, labels, ood = _prompt_data()
    return prompt_sensitivity(None, Features(embedding=id_x), {k: Features(embedding=v) for k, v in ood.items()},
                              ["cat", "dog"], variants=VARIANTS, text_encoder=DictEncoder(), id_labels=labels,
                              progress=False)


def test_prompt_result_save_load_csv_and_plot(tmp_path: Path) -> None:
    result = _prompt_result()
    result.save(tmp_path)
    loaded = load_audit(tmp_path)["prompt_sensitivity"]
    assert loaded.to_dict() == json.loads(json.dumps(result.to_dict()))
    import csv

    with open(tmp_path / "prompt_audit.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.rows)
    assert float(rows[0]["auroc"]) == pytest.approx(result.rows[0]["auroc"])
    with open(tmp_path / "prompt_summary.csv") as fh:
        summary = {r["ood_set"]: r for r in csv.DictReader(fh)}
    assert set(summary) == {"near", "far", "mean"}
    assert summary["near"]["best"] == "sharp"
    with open(tmp_path / "prompt_variants.csv") as fh:
        variants = list(csv.DictReader(fh))
    assert variants[3]["example"] == "a photo of a kitten."
    png = plot_prompt_sensitivity(result, tmp_path / "img" / "prompts.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    png2 = plot_prompt_sensitivity(json.loads((tmp_path / "audit.json").read_text())["audits"]["prompt_sensitivity"],
                                   tmp_path / "p2.png", metric="fpr95")
    from PIL import Image

    with Image.open(png2) as im:
        assert im.size[0] > 300 and im.size[1] > 200


# ----------------------------------------------------------------------------- corruption audit
class TinyVLM:
    """A tiny vision-language backbone: TinyCNN penultimate features as image embeddings, and
    texts hashed to random unit vectors of the same dimension."""

    def __init__(self) -> None:
        from tiny_models import tiny_classifier

        self._clf = tiny_classifier(seed=1)
        self.id = "tiny-vlm"
        self.input_spec = self._clf.input_spec
        self.device = "cpu"

    def weights_fingerprint(self) -> str:
        return self._clf.weights_fingerprint()

    def encode_images(self, batch: torch.Tensor) -> Features:
        f = self._clf.encode_images(batch)
        f.embedding = unit(f.penultimate + 1e-3).astype(np.float32)
        f.backbone_id = self.id
        return f

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            rows.append(unit(np.random.default_rng(seed).standard_normal(8)))
        return np.asarray(rows, dtype=np.float32)


def _images(kind: str, n: int, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:16, 0:16]
    if kind == "id":  # bright blobs at random places
        out = []
        for _ in range(n):
            cy, cx = rng.integers(4, 12, 2)
            out.append(255 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 10.0))
        imgs = np.asarray(out)
        labels = rng.integers(0, 2, n)
        return ArrayDataset(imgs.astype(np.uint8), labels, ["a", "b"], name=f"id{seed}")
    imgs = rng.integers(0, 256, (n, 16, 16))  # OOD: noise
    return ArrayDataset(imgs.astype(np.uint8), name=f"ood{seed}")


def _chunks(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("chunk-*.safetensors"))


def test_corruption_audit_end_to_end(tmp_path: Path) -> None:
    from oodscope.detectors import create

    backbone = TinyVLM()
    id_src, ood_src, fit_src = _images("id", 12, 0), _images("ood", 10, 1), _images("id", 12, 2)
    detectors = {"mcm": "mcm", "msp": "msp", "knn": ("knn", {"k": 2})}
    kwargs = dict(corruptions=["gaussian_noise", "contrast"], severities=[3, 0], id_fit=fit_src, classes=["a", "b"],
                  seed=4, work_size=32, cache_dir=tmp_path / "cache", num_workers=0, progress=False)
    result = corruption_robustness(backbone, detectors, id_src, {"noise": ood_src}, **kwargs)
    assert isinstance(result, CorruptionAuditResult)
    assert result.severities == [0, 3] and len(result.rows) == 3 * 2 * 2
    assert result.detectors["knn"] == {"name": "knn", "params": {**create("knn").get_params(), "k": 2}}

    # independent computation: fit each detector on clean fit features, score clean / corrupted images
    def feats(src):
        return extract(backbone, src, num_workers=0, progress=False).features

    fit_f = feats(fit_src)
    fitted = {"mcm": create("mcm", classes=["a", "b"]).fit(text_encoder=backbone), "msp": create("msp").fit(fit_f),
              "knn": create("knn", k=2).fit(fit_f)}
    text = fitted["mcm"].state_["class_text"].numpy()
    for corruption, severity in (("gaussian_noise", 0), ("gaussian_noise", 3), ("contrast", 3)):
        id_f = feats(CorruptedSource(id_src, corruption, severity, 4, work_size=32))
        ood_f = feats(CorruptedSource(ood_src, corruption, severity, 4, work_size=32))
        for name, det in fitted.items():
            s_id, s_ood = det.score(id_f), det.score(ood_f)
            if name == "mcm":  # the zero-shot score itself, from the formula
                np.testing.assert_allclose(s_id, ref_mcm(id_f.embedding, text), atol=1e-6)
            row = next(r for r in result.rows if r["detector"] == name and r["corruption"] == corruption
                       and r["severity"] == severity)
            assert row["auroc"] == pytest.approx(ref_auroc(s_id, s_ood), abs=1e-9)
            assert row["fpr95"] == pytest.approx(ref_fpr95(s_id, s_ood), abs=1e-9)
    # corrupting changes what the detectors see
    assert any(r["severity"] == 3 and r["auroc"] != next(
        q["auroc"] for q in result.rows if q["detector"] == r["detector"] and q["severity"] == 0)
        for r in result.rows)
    # summary: mean over OOD sets (one here) and corruptions, drops
    for det in detectors:
        for c in ("gaussian_noise", "contrast"):
            s = result.summary[det][c]
            at = {sev: next(r["auroc"] for r in result.rows if r["detector"] == det and r["corruption"] == c
                            and r["severity"] == sev) for sev in (0, 3)}
            assert s["auroc"] == pytest.approx({"0": at[0], "3": at[3]})
            assert s["drop_at_3"] == pytest.approx(at[0] - at[3]) and s["drop_at_5"] is None
        m = result.summary[det]["mean"]
        assert m["auroc"]["3"] == pytest.approx(
            np.mean([result.summary[det][c]["auroc"]["3"] for c in ("gaussian_noise", "contrast")]))
        assert result.curve(det, "contrast") == ([0, 3], [result.summary[det]["contrast"]["auroc"]["0"],
                                                          result.summary[det]["contrast"]["auroc"]["3"]])
        assert result.curve(det, "contrast", ood_set="noise")[1] == pytest.approx(result.curve(det, "contrast")[1])

    # a repeated audit is served from the cache: no new chunk is written, same numbers
    before = _chunks(tmp_path / "cache")
    again = corruption_robustness(backbone, detectors, id_src, {"noise": ood_src}, **kwargs)
    assert _chunks(tmp_path / "cache") == before
    assert [r["auroc"] for r in again.rows] == [r["auroc"] for r in result.rows]

    # persistence: both audits share audit.json; plots are PNGs
    result.save(tmp_path / "out")
    _prompt_result().save(tmp_path / "out")
    loaded = load_audit(tmp_path / "out")
    assert set(loaded) == {"prompt_sensitivity", "corruption_robustness"}
    assert loaded["corruption_robustness"].to_dict() == json.loads(json.dumps(result.to_dict()))
    assert (tmp_path / "out" / "corruption_summary.csv").read_text().splitlines()[0].startswith(
        "detector,corruption,auroc_s0,auroc_s3")
    png = plot_corruption_curves(loaded["corruption_robustness"], tmp_path / "out" / "curves.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert "drop@3" in result.table()


def test_corruption_audit_one_sided(tmp_path: Path) -> None:
    from oodscope.detectors import create

    backbone = TinyVLM()
    id_src, ood_src = _images("id", 10, 5), _images("ood", 8, 6)
    kwargs = dict(corruptions=["pixelate"], severities=[0, 5], classes=["a", "b"], work_size=32,
                  cache_dir=tmp_path, num_workers=0, progress=False)
    det = create("mcm", classes=["a", "b"]).fit(text_encoder=backbone)

    def feats(src):
        return extract(backbone, src, cache_dir=tmp_path, num_workers=0, progress=False).features

    for side in ("id", "ood"):
        result = corruption_robustness(backbone, ["mcm"], id_src, {"o": ood_src}, apply_to=side, **kwargs)
        id_f = feats(CorruptedSource(id_src, "pixelate", 5, 0, work_size=32) if side == "id" else id_src)
        ood_f = feats(CorruptedSource(ood_src, "pixelate", 5, 0, work_size=32) if side == "ood" else ood_src)
        row = next(r for r in result.rows if r["severity"] == 5)
        assert row["auroc"] == pytest.approx(ref_auroc(det.score(id_f), det.score(ood_f)), abs=1e-9)


def test_corruption_audit_argument_checks(tmp_path: Path) -> None:
    backbone = TinyVLM()
    id_src, ood_src = _images("id", 4, 0), _images("ood", 4, 1)
    common = dict(corruptions=["contrast"], severities=[0, 1], classes=["a", "b"], num_workers=0, progress=False)
    with pytest.raises(ValueError, match="id_fit"):
        corruption_robustness(backbone, ["knn"], id_src, {"o": ood_src}, **common)
    with pytest.raises(ValueError, match="model in the loop"):
        corruption_robustness(backbone, ["odin"], id_src, {"o": ood_src}, **common)
    with pytest.raises(ValueError, match="unknown corruptions"):
        corruption_robustness(backbone, ["mcm"], id_src, {"o": ood_src}, **{**common, "corruptions": ["snow"]})
    with pytest.raises(ValueError, match="apply_to"):
        corruption_robustness(backbone, ["mcm"], id_src, {"o": ood_src}, apply_to="all", **common)
    with pytest.raises(TypeError, match="ImageSource"):
        corruption_robustness(backbone, ["mcm"], id_src, {"o": Features(embedding=np.ones((2, 8)))}, **common)


class _Stateful:
    """Scores depend on what was seen since reset (like AdaNeg); records resets and stream order."""

    def __init__(self) -> None:
        self.resets = 0
        self.streams: list[np.ndarray] = []

    def reset(self):
        self.resets += 1
        return self

    def fit_needs(self) -> FitNeeds:
        return FitNeeds(text_encoder=True, classes=True, adaptive=True)  # what the test-time-adaptive kind declares

    def score(self, f: Features) -> np.ndarray:
        self.streams.append(f.embedding[:, 0].copy())
        return f.embedding[:, 0].astype(np.float64)


def test_stateful_detectors_get_a_fresh_shuffled_stream() -> None:
    rng = np.random.default_rng(0)
    id_f, ood_f = Features(embedding=rng.random((20, 2))), Features(embedding=rng.random((15, 2)) + 0.3)
    det = _Stateful()
    m = pair_metrics(det, id_f, ood_f, None, seed=1)
    assert det.resets == 1 and len(det.streams) == 1 and len(det.streams[0]) == 35
    both = np.concatenate([id_f.embedding[:, 0], ood_f.embedding[:, 0]])
    assert not np.array_equal(det.streams[0], both) and np.array_equal(np.sort(det.streams[0]), np.sort(both))
    assert m["auroc"] == pytest.approx(ref_auroc(id_f.embedding[:, 0], ood_f.embedding[:, 0]))


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_prompt_and_corruption_audits(tmp_path: Path, conse_lite0) -> None:
    from oodscope.cli.main import main

    out = tmp_path / "audit"
    common = ["--id", "fashion-mnist-ood/id", "--ood", "near=fashion-mnist-ood/near", "--ood", "digits=digits",
              "--limit", "20", "-o", str(out), "--cache", str(tmp_path / "cache"), "--workers", "0", "--quiet"]
    assert main(["audit", "prompts", "--domain", "clothing", *common]) == 0
    # a classifier backbone keeps this half fast (no sentence encoder to load)
    assert main(["audit", "corruptions", "--backbone", "effnet-lite0", "--detectors", "msp,energy",
                 "--corruptions", "gaussian_noise", "--severities", "0,2", *common]) == 0
    loaded = load_audit(out)
    prompts, corr = loaded["prompt_sensitivity"], loaded["corruption_robustness"]
    assert prompts.n_id == 20 and prompts.n_ood == {"near": 20, "digits": 20}
    assert prompts.classes == ["T-shirt/top", "Trouser", "Dress", "Sandal", "Sneaker", "Bag"]
    assert len(prompts.variants) > 20 and prompts.summary["mean"]["auroc"]["spread"] > 0
    assert corr.severities == [0, 2] and set(corr.summary) == {"msp", "energy"}
    assert corr.backbone_id == "effnet-lite0" and corr.n_ood == {"near": 20, "digits": 20}
    for name in ("prompt_sensitivity.png", "corruption_curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    from oodscope import reports

    if callable(getattr(reports, "write_audit_report", None)):  # the CLI builds the HTML report when it can
        assert (out / "report.html").stat().st_size > 0
    for name in ("prompt_audit.csv", "prompt_summary.csv", "prompt_variants.csv", "corruption_audit.csv",
                 "corruption_summary.csv"):
        assert (out / name).stat().st_size > 0
