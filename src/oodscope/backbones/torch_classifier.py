"""Any PyTorch classifier the user brings, wrapped as an oodscope backbone with forward hooks.

The user names the final linear layer (``head``); its input is the penultimate feature and its
output the logits. Optionally the user names the module whose output is the last spatial feature
map (``feature_map``, e.g. ``"layer4"`` of a ResNet) for RankFeat and patch features; the model is
then assumed to be ``head(pool(feature_map(x)))`` with global average pooling, as in ResNets,
EfficientNets, ConvNeXts (check ``logits`` against the model's own output if unsure — the
constructor does it once with ``check=True``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from oodscope.backbones.base import ClassifierParts, Features, InputSpec
from oodscope.backbones.dense import dense_option, to_dense_array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _module(model: torch.nn.Module, ref: str | torch.nn.Module) -> torch.nn.Module:
    if isinstance(ref, torch.nn.Module):
        return ref
    try:
        return model.get_submodule(ref)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(f"model has no submodule {ref!r}; some names: {names[-12:]}") from None


class TorchClassifier:
    """Wrap ``model`` (an ``nn.Module`` mapping images to logits).

    Parameters: ``head`` — the final ``nn.Linear`` (name or module); ``feature_map`` — optional
    module producing the last (N, C, H, W) map; ``input_spec`` — how to prepare images (default:
    224 px, ImageNet mean/std); ``class_names``; ``id`` — a name recorded with features and fitted
    models; ``patches``/``layers`` — also return feature-map cells / the given layers' pooled outputs;
    ``dense_layers`` — names of modules whose (N, C, h, w) outputs are returned as ``Features.dense``
    (captured with forward hooks, float16; e.g. ``["layer2", "layer3"]`` of a ResNet, PatchCore's
    choice). The maps cover what ``input_spec`` feeds the network: with its default centre crop a map
    covers the crop only (pass ``InputSpec(..., resize="stretch")`` for maps of whole images).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        head: str | torch.nn.Module,
        *,
        feature_map: str | torch.nn.Module | None = None,
        input_spec: InputSpec | None = None,
        class_names: list[str] | None = None,
        id: str = "torch-classifier",
        device: str | None = None,
        patches: bool = False,
        layers: list[str] | None = None,
        dense_layers: list[str] | tuple[str, ...] | str | None = None,
    ) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.head = _module(self.model, head)
        if not isinstance(self.head, torch.nn.Linear):
            raise TypeError(f"head must be a torch.nn.Linear, got {type(self.head).__name__}")
        self.feature_map_module = _module(self.model, feature_map) if feature_map is not None else None
        if patches and self.feature_map_module is None:
            raise ValueError("patches=True needs feature_map= (the module producing the last spatial map)")
        self.layer_names = list(layers or [])
        self.layer_modules = {name: _module(self.model, name) for name in self.layer_names}
        if dense_layers is True:
            raise ValueError("dense_layers=True: a TorchClassifier has no default dense layers; name the modules "
                             "(e.g. dense_layers=['layer2', 'layer3'])")
        self.dense_layers = dense_option(dense_layers, (), who=id)
        self.dense_modules = {name: _module(self.model, name) for name in self.dense_layers}
        self.input_spec = input_spec or InputSpec(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.class_names = class_names
        self.id = id
        self.want_patches = patches
        self.want_layers = bool(self.layer_names)

    def weights_fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        captured: dict[str, torch.Tensor] = {}
        hooks = [self.head.register_forward_hook(lambda m, i, o: captured.__setitem__("penultimate", i[0]))]
        if self.feature_map_module is not None:
            hooks.append(self.feature_map_module.register_forward_hook(
                lambda m, i, o: captured.__setitem__("feature_map", o)))
        for name, module in self.layer_modules.items():
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: captured.__setitem__(f"layer:{name}", o)))
        for name, module in self.dense_modules.items():
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: captured.__setitem__(f"dense:{name}", o)))
        try:
            logits = self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
        if not torch.is_tensor(logits):
            logits = getattr(logits, "logits", None)
            if logits is None:
                raise TypeError("the model's output must be the logits tensor (or have a .logits attribute)")
        return logits, captured

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> Features:
        logits, captured = self._run(batch.to(self.device))
        penultimate = captured["penultimate"].flatten(1).float()
        patches = None
        if self.want_patches:
            patches = captured["feature_map"].flatten(2).transpose(1, 2).float().cpu().numpy()
        layers = {}
        for name in self.layer_names:
            value = captured[f"layer:{name}"]
            layers[name] = (value.mean(dim=(2, 3)) if value.ndim == 4 else value.flatten(1)).float().cpu().numpy()
        dense = {}
        for name in self.dense_layers:
            value = captured[f"dense:{name}"]
            if not torch.is_tensor(value) or value.ndim != 4:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"dense layer {name!r} gives {shape}, not a (N, C, h, w) feature map")
            dense[name] = to_dense_array(value)
        pen = penultimate.cpu().numpy()
        return Features(
            embedding=pen,
            logits=logits.float().cpu().numpy(),
            penultimate=pen,
            patches=patches,
            layers=layers,
            dense=dense,
            weight=self.head.weight.detach().float().cpu().numpy(),
            bias=(self.head.bias.detach().float().cpu().numpy() if self.head.bias is not None
                  else np.zeros(self.head.out_features, dtype=np.float32)),
            class_names=self.class_names,
            backbone_id=self.id,
        )

    def classifier_parts(self) -> ClassifierParts:
        if self.feature_map_module is not None:
            def feature_map(x: torch.Tensor) -> torch.Tensor:
                return self._run(x)[1]["feature_map"]

            def pool(fmap: torch.Tensor) -> torch.Tensor:
                return fmap.mean(dim=(2, 3)) if fmap.ndim == 4 else fmap.flatten(1)
        else:
            def feature_map(x: torch.Tensor) -> torch.Tensor:
                return self._run(x)[1]["penultimate"].flatten(1)

            def pool(fmap: torch.Tensor) -> torch.Tensor:
                return fmap

        def layers(x: torch.Tensor) -> dict[str, torch.Tensor]:
            # pooled as encode_images pools Features.layers, but differentiable
            captured = self._run(x)[1]
            return {name: (v.mean(dim=(2, 3)) if v.ndim == 4 else v.flatten(1))
                    for name in self.layer_names for v in [captured[f"layer:{name}"]]}

        return ClassifierParts(feature_map=feature_map, pool=pool, head=self.head,
                               input_spec=self.input_spec, device=self.device, network=self.model,
                               layers=layers if self.layer_names else None)
