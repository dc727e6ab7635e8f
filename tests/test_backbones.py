"""Backbones: preprocessing geometry, the packaged classifier on real photos, ConSE, torch and HF wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_classifier

from oodscope.backbones import Features, InputSpec, create, is_vision_language, list_backbones
from oodscope.backbones.preprocess import normalize_batch, prepare_pixels, preprocess

# ---------------------------------------------------------------- preprocessing


def _gradient_image(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)


def test_center_crop_without_scaling_is_an_exact_slice():
    arr = _gradient_image(300, 200)
    spec = InputSpec(size=200, mean=(0, 0, 0), std=(1, 1, 1), crop_fraction=1.0)
    out = prepare_pixels(Image.fromarray(arr), spec)
    np.testing.assert_array_equal(out, arr[:, 50:250])


def test_center_crop_fraction_keeps_the_central_box():
    arr = _gradient_image(300, 200)
    spec = InputSpec(size=100, mean=(0, 0, 0), std=(1, 1, 1), crop_fraction=0.5)
    out = prepare_pixels(Image.fromarray(arr), spec)
    np.testing.assert_array_equal(out, arr[50:150, 100:200])


def test_stretch_and_letterbox_geometry():
    arr = np.zeros((50, 100, 3), np.uint8)
    arr[:] = (200, 10, 10)
    stretched = prepare_pixels(Image.fromarray(arr), InputSpec(size=64, mean=(0,) * 3, std=(1,) * 3, resize="stretch"))
    assert stretched.shape == (64, 64, 3) and (stretched == (200, 10, 10)).all()
    boxed = prepare_pixels(Image.fromarray(arr), InputSpec(size=64, mean=(0,) * 3, std=(1,) * 3, resize="letterbox"))
    # 100x50 fits as 64x32, centred: rows 16..47 are the image, the rest background (black).
    assert (boxed[:16] == 0).all() and (boxed[48:] == 0).all()
    assert (boxed[17:47] == (200, 10, 10)).all()


def test_normalize_batch_matches_numpy_formula():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    spec = InputSpec(size=8, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    out = normalize_batch(pixels, spec).numpy()
    expected = ((pixels / 255.0 - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_input_spec_key_changes_with_preprocessing():
    a = InputSpec(size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert a.key() != InputSpec(size=224, mean=(0.5,) * 3, std=(0.5,) * 3, crop_fraction=1.0).key()
    assert a.key() != InputSpec(size=128, mean=(0.5,) * 3, std=(0.5,) * 3).key()


# ---------------------------------------------------------------- Features container


def test_features_validate_rows_and_subset_concatenate():
    f = Features(embedding=np.zeros((4, 2)), logits=np.arange(12.0).reshape(4, 3), weight=np.ones((3, 2)))
    assert f.available() == {"embedding", "logits", "weight"}
    sub = f.subset([2, 0])
    np.testing.assert_array_equal(sub.logits, f.logits[[2, 0]])
    assert sub.weight is f.weight
    both = Features.concatenate([f, sub])
    assert len(both) == 6
    with pytest.raises(ValueError, match="rows"):
        Features(embedding=np.zeros((4, 2)), logits=np.zeros((3, 3)))


# ---------------------------------------------------------------- registry


def test_registry_specs_and_errors():
    with pytest.raises(ValueError, match="unknown backbone"):
        create("resnet-9000")
    specs = {info.spec: info for info in list_backbones()}
    assert {"effnet-lite0", "conse:effnet-lite0", "hf:<hub id or local dir>"} <= set(specs)
    assert specs["effnet-lite3"].available_offline is False or specs["effnet-lite3"].note == ""


# ---------------------------------------------------------------- EfficientNet-Lite (real weights)


@pytest.mark.slow
def test_effnet_recognizes_real_photos(effnet_lite0, sample_photos):
    images = [Image.fromarray(a) for a in sample_photos.values()]
    features = effnet_lite0.encode_images(preprocess(images, effnet_lite0.input_spec))
    names = features.class_names
    top5 = [[names[i] for i in np.argsort(-row)[:5]] for row in features.logits]
    expected = {"cat": {"tabby", "tiger cat", "Egyptian cat"}, "coffee": {"espresso", "cup"},
                "rocket": {"missile", "projectile"}, "flower": {"daisy"}}
    for (label, _), guesses in zip(sample_photos.items(), top5, strict=True):
        if label in expected:
            assert expected[label] & set(guesses), (label, guesses)
    # The contract: logits are the last linear layer applied to the penultimate features.
    recomputed = features.penultimate @ features.weight.T + features.bias
    np.testing.assert_allclose(recomputed, features.logits, rtol=1e-4, atol=1e-3)
    assert features.embedding.shape == (len(images), 1280) and features.backbone_id == "effnet-lite0"


@pytest.mark.slow
def test_effnet_parts_patches_and_layers_are_consistent(effnet_lite0, sample_photos):
    from oodscope.backbones.efficientnet import EfficientNetLite

    rich = EfficientNetLite(0, device="cpu", patches=True, layers=True)
    batch = preprocess([Image.fromarray(sample_photos["cat"])], rich.input_spec)
    features = rich.encode_images(batch)
    assert features.patches.shape == (1, 49, 1280)
    np.testing.assert_allclose(features.patches.mean(axis=1), features.penultimate, rtol=1e-4, atol=1e-5)
    assert len(features.layers) >= 5 and all(v.shape[0] == 1 for v in features.layers.values())
    parts = rich.classifier_parts()
    with torch.no_grad():
        logits = parts.head(parts.pool(parts.feature_map(batch))).numpy()
    np.testing.assert_allclose(logits, features.logits, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(rich.forward_logits(batch).numpy(), features.logits, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- ConSE


@pytest.mark.slow
def test_conse_embedding_is_the_convex_combination(conse_lite0, sample_photos):
    batch = preprocess([Image.fromarray(a) for a in sample_photos.values()], conse_lite0.input_spec)
    features = conse_lite0.encode_images(batch)
    labels = conse_lite0.label_embeddings.numpy()
    logits = features.logits.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = []
    for row in probs:  # independent reference: explicit top-T loop
        top = np.argsort(-row)[: conse_lite0.top_t]
        mix = (row[top, None] * labels[top]).sum(0) / row[top].sum()
        expected.append(mix / np.linalg.norm(mix))
    np.testing.assert_allclose(features.embedding, np.array(expected), rtol=1e-4, atol=1e-5)
    assert is_vision_language(conse_lite0)


@pytest.mark.slow
def test_conse_zero_shot_on_real_photos_is_far_above_chance(conse_lite0, sample_photos):
    names = list(sample_photos)
    batch = preprocess([Image.fromarray(a) for a in sample_photos.values()], conse_lite0.input_spec)
    image_emb = conse_lite0.encode_images(batch).embedding
    text_emb = conse_lite0.encode_texts([f"a photo of a {n}." for n in names])
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, rtol=1e-5)
    predictions = (image_emb @ text_emb.T).argmax(1)
    accuracy = (predictions == np.arange(len(names))).mean()
    assert accuracy >= 5 / 6  # chance is 1/6


@pytest.mark.slow
def test_conse_zero_shot_on_fashion_mnist_beats_chance(conse_lite0):
    from scipy.stats import binomtest

    from oodscope.features.extract import extract
    from oodscope.io import FASHION_MNIST_CLASSES, Subset, fashion_mnist

    try:
        data = fashion_mnist("test")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    sample = Subset(data, np.arange(200))
    result = extract(conse_lite0, sample, batch_size=50, num_workers=0, progress=False)
    text = conse_lite0.encode_texts([n.lower() for n in FASHION_MNIST_CLASSES])
    predictions = (result.features.embedding @ text.T).argmax(1)
    correct = int((predictions == result.labels).sum())
    # 10 classes: one-sided binomial test against chance, at a strict level.
    assert binomtest(correct, len(predictions), 0.1, alternative="greater").pvalue < 1e-3


# ---------------------------------------------------------------- user torch classifier


def test_torch_classifier_hooks_and_parts():
    backbone = tiny_classifier(patches=True, layers=["body.0"])
    x = torch.randn(4, 3, 32, 32)
    features = backbone.encode_images(x)
    with torch.no_grad():
        direct = backbone.model(x).numpy()
    np.testing.assert_allclose(features.logits, direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(features.penultimate @ features.weight.T + features.bias, direct, rtol=1e-5, atol=1e-5)
    assert features.patches.shape == (4, 64, 8)
    np.testing.assert_allclose(features.patches.mean(1), features.penultimate, rtol=1e-5, atol=1e-6)
    assert features.layers["body.0"].shape == (4, 8)
    parts = backbone.classifier_parts()
    with torch.no_grad():
        np.testing.assert_allclose(parts.head(parts.pool(parts.feature_map(x))).numpy(), direct, rtol=1e-5, atol=1e-6)
    assert len(backbone.weights_fingerprint()) == 16


def test_torch_classifier_rejects_bad_layers():
    from tiny_models import TinyCNN

    from oodscope.backbones.torch_classifier import TorchClassifier

    with pytest.raises(ValueError, match="no submodule"):
        TorchClassifier(TinyCNN(), "nope")
    with pytest.raises(TypeError, match="nn.Linear"):
        TorchClassifier(TinyCNN(), "body")


# ---------------------------------------------------------------- Hugging Face CLIP / SigLIP (tiny random)


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "a", "photo", "of", "cat", "dog", "car", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like CLIP's tokenizer: wrap in BOS ... EOS (the text tower pools at the EOS token).
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(path)
    return len(words)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny-clip")
    vocab = _tiny_tokenizer(path)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=3, pad_token_id=0,
                         bos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    return path


def test_hf_clip_offline_from_local_dir(tiny_clip_dir):
    backbone = create(f"hf:{tiny_clip_dir}", device="cpu", patches=True)
    assert backbone.input_spec.size == 32 and backbone.input_spec.crop_fraction == 1.0
    x = torch.randn(3, 3, 32, 32)
    features = backbone.encode_images(x)
    assert features.embedding.shape == (3, 16) and features.patches.shape == (3, 16, 16)
    np.testing.assert_allclose(np.linalg.norm(features.embedding, axis=1), 1.0, rtol=1e-5)
    # Independent path: the model's own image-feature function.
    with torch.no_grad():
        own = backbone.model.get_image_features(pixel_values=x)
    own = getattr(own, "pooler_output", own)
    own = torch.nn.functional.normalize(own, dim=-1).numpy()
    np.testing.assert_allclose(features.embedding, own, rtol=1e-4, atol=1e-5)
    texts = backbone.encode_texts(["a photo of a cat .", "a photo of a dog ."])
    assert texts.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    tokens = backbone.tokenizer(["a photo of a cat ."], return_tensors="pt")
    with torch.no_grad():
        own_text = backbone.model.get_text_features(input_ids=tokens["input_ids"])
    own_text = torch.nn.functional.normalize(getattr(own_text, "pooler_output", own_text), dim=-1).numpy()
    np.testing.assert_allclose(texts[:1], own_text, rtol=1e-4, atol=1e-5)
    assert features.logit_scale == pytest.approx(float(np.exp(backbone.model.config.logit_scale_init_value)), rel=1e-4)
    assert is_vision_language(backbone)


def test_hf_rejects_non_clip_models(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                            intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type"):
        create(f"hf:{tmp_path}")


@pytest.mark.slow
def test_effnet_batchnorm_folding_keeps_outputs(effnet_lite0, sample_photos):
    from oodscope.backbones.efficientnet import EfficientNetLite

    eager = EfficientNetLite(0, device="cpu", fuse_batchnorm=False)
    batch = preprocess([Image.fromarray(a) for a in sample_photos.values()], eager.input_spec)
    assert isinstance(effnet_lite0.model._bn0, torch.nn.Identity)
    assert not isinstance(eager.model._bn0, torch.nn.Identity)
    fast, slow = effnet_lite0.encode_images(batch), eager.encode_images(batch)
    np.testing.assert_allclose(fast.logits, slow.logits, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(fast.penultimate, slow.penultimate, rtol=1e-4, atol=1e-4)


def test_conse_label_embeddings_are_cached_on_disk(tmp_path, monkeypatch):
    import oodscope.backbones.conse as conse_module
    from oodscope.backbones.conse import ConSE

    class CountingEncoder:
        calls = 0

        def weights_fingerprint(self) -> str:
            return "counting-encoder-v1"

        def encode_texts(self, texts):
            CountingEncoder.calls += 1
            rng = np.random.default_rng(len(texts))
            out = rng.normal(size=(len(texts), 8)).astype(np.float32)
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(conse_module, "_LABEL_MEMO", {})
    first = ConSE(tiny_classifier(), CountingEncoder()).label_embeddings
    assert CountingEncoder.calls == 1 and first.shape == (1000, 8)
    monkeypatch.setattr(conse_module, "_LABEL_MEMO", {})  # a new process: only the disk is left
    again = ConSE(tiny_classifier(), CountingEncoder()).label_embeddings
    assert CountingEncoder.calls == 1
    assert torch.equal(first, again)
    other = ConSE(tiny_classifier(), CountingEncoder(), label_template="a photo of a {}.").label_embeddings
    assert other.shape == (1000, 8)
    assert CountingEncoder.calls == 2  # other texts, other key


def test_gradient_methods_run_on_a_backbone_first_used_by_extraction():
    """Extraction builds the network inside inference_mode; ODIN on the same instance must still
    backpropagate (regression: the weights were inference tensors)."""
    from oodscope.backbones.efficientnet import EfficientNetLite
    from oodscope.detectors import create

    backbone = EfficientNetLite(0, device="cpu", image_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        backbone.encode_images(x)
    perturbed = create("odin", temperature=1.0, epsilon=0.01).score_images(backbone.classifier_parts(), x)
    plain = create("odin", temperature=1.0, epsilon=0.0).score_images(backbone.classifier_parts(), x)
    assert np.isfinite(perturbed).all() and not np.allclose(perturbed, plain)
