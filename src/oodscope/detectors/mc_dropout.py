"""MC Dropout — the spread of the predictions over random dropout masks.

Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep
Learning", ICML 2016; pytorch-ood ``detector/mcd.py`` (``MCD``).

With ``p_t = softmax(f_t(x))`` for ``T`` forward passes ``f_t`` with dropout on, ``pbar`` their mean:
``mode="var"``: ``(1/C) sum_c Var_t[p_t,c]`` (unbiased over the passes; pytorch-ood's default mode);
``mode="mean"``: ``1 - max_c pbar_c`` (pytorch-ood's ``mean`` mode is ``-max_c pbar_c``: the same
ranking); ``mode="entropy"``: ``-sum_c pbar_c log pbar_c``, the predictive entropy.
Defaults: ``samples=30`` and ``mode="var"`` (pytorch-ood ``MCD``), ``seed=0``.

The network is ``ClassifierParts.network`` run as the model runs itself (EfficientNet-Lite: its
forward applies ``_dropout``, an ``nn.Dropout(0.2)`` for Lite0, before ``_fc``; the
``feature_map``/``pool``/``head`` split skips it). A network without an active dropout module
(``nn.Dropout``, ``Dropout1d/2d/3d`` with ``p > 0``) is refused. Batch norm, drop-connect and every
other module stay in eval mode (pytorch-ood switches the whole model to train mode except batch
norm; for networks whose only train-time behaviour is dropout and batch norm that is the same).

Masks. Rather than switching the dropout modules to train mode (whose masks come from the global
random state, so an image's score would depend on its position in the batch and on everything run
before), each dropout module of pass ``t`` draws one inverted-dropout mask (keep with ``1 - p``,
scale ``1 / (1 - p)``; per channel for ``DropoutNd``) from a generator seeded by ``(seed, t, module)``
and applies it to every image of the batch. Each image thus sees ``T`` independent masks, exactly as
in MC Dropout, and its score is reproducible and independent of the batch (masks being shared across
the images of a batch does not change any image's predictive distribution).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from oodscope.backbones.base import ClassifierParts
from oodscope.detectors._model_based import ModelBasedDetector
from oodscope.detectors.base import DetectorError, register

MODES = ("var", "mean", "entropy")
_DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)


def dropout_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The network's standard dropout modules that drop something (``p > 0``), in module order."""
    return [m for m in network.modules() if type(m) in _DROPOUTS and m.p > 0]


def _mask(module: torch.nn.Module, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One inverted-dropout mask for a row of ``like`` (N, ...); per channel for ``DropoutNd``."""
    shape = list(like.shape[1:])
    if type(module) is not torch.nn.Dropout:  # Dropout1d/2d/3d zero whole channels
        shape = shape[:1] + [1] * (len(shape) - 1)
    keep = 1.0 - float(module.p)
    bern = torch.rand(shape, generator=generator, dtype=torch.float64) < keep
    return (bern.to(like.dtype) / keep).to(like.device)[None]


@register
class MCDropout(ModelBasedDetector):
    name = "mc_dropout"
    #: T passes of the whole network per batch: smaller batches bound the memory.
    image_batch_size: ClassVar[int] = 32

    def __init__(self, samples: int = 30, mode: str = "var", seed: int = 0) -> None:
        super().__init__()
        if int(samples) != samples or samples < 2:
            raise DetectorError(f"mc_dropout: samples must be an integer >= 2, got {samples}")
        if mode not in MODES:
            raise DetectorError(f"mc_dropout: mode must be one of {MODES}, got {mode!r}")
        self.samples = samples
        self.mode = mode
        self.seed = seed

    def _score_batch(self, parts: ClassifierParts, images: torch.Tensor) -> torch.Tensor:
        network = parts.network
        if not isinstance(network, torch.nn.Module):
            raise DetectorError(
                "mc_dropout: needs the whole network (ClassifierParts.network), which this backbone does not "
                "expose (an exported ONNX/OpenVINO model has no dropout to switch on)"
            )
        if network.training:
            raise DetectorError("mc_dropout: the network is in training mode; call .eval() first")
        drops = dropout_modules(network)
        if not drops:
            raise DetectorError(
                "mc_dropout: the network has no dropout module with p > 0 (torch.nn.Dropout, Dropout1d/2d/3d), so "
                "every pass would give the same prediction; MC Dropout needs a network trained with dropout"
            )
        passes = []
        for t in range(int(self.samples)):
            hooks = []
            for k, module in enumerate(drops):
                generator = torch.Generator().manual_seed(_seed(int(self.seed), t, k))
                # In eval mode a dropout module returns its input; the hook applies this pass's mask.
                hooks.append(module.register_forward_hook(
                    lambda m, i, o, gen=generator: o * _mask(m, o, gen)))
            try:
                out = network(images)
            finally:
                for hook in hooks:
                    hook.remove()
            logits = out if torch.is_tensor(out) else getattr(out, "logits", None)
            if not torch.is_tensor(logits) or logits.ndim != 2:
                raise DetectorError("mc_dropout: the network must return (N, C) logits (or an object with .logits)")
            passes.append(logits.to(torch.float64))
        p = torch.softmax(torch.stack(passes), dim=2)  # (T, N, C), one call for all passes
        if self.mode == "var":
            return p.var(dim=0).mean(dim=1)
        mean = p.mean(dim=0)
        if self.mode == "mean":
            return 1.0 - mean.amax(dim=1)
        return -(mean * torch.log(mean.clamp_min(1e-300))).sum(dim=1)


def _seed(seed: int, t: int, k: int) -> int:
    # distinct, reproducible streams per (seed, pass, module)
    return (seed * 1_000_003 + t) * 1_009 + k
