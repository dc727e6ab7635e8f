"""Named hyper-parameter presets: the defaults of a protocol, in one table, each value with its source.

Papers, their official code and OpenOOD v1.5 disagree on defaults (DICE's sparsity is 70 in the
authors' ImageNet script and 90 in OpenOOD; KNN's k is 1000 in the authors' ImageNet script and 50 in
OpenOOD; ...). A preset names one protocol; :func:`resolve_params` gives a detector's parameters under
it: the preset's values, then the caller's explicit parameters on top (an explicit value always
wins). A detector a preset does not list keeps its class defaults (the class docstring gives their
sources); :data:`NOT_SET` says why, where a detector is deliberately left out, and :data:`GAPS` what an
official protocol does that no parameter can express.

Used by ``oodscope.detectors.create(name, preset=..., **params)``, ``OODModel(..., preset=...)``,
``oodscope fit --preset`` and ``oodscope bench --preset`` (``BenchConfig.preset``); saved detectors and
models record the preset's name next to the resolved parameters.

Sources, as read (repository @ commit, file):

- OpenOOD v1.5: ``Jingkang50/OpenOOD`` @ 3c35632e, ``configs/postprocessors/<name>.yml``
  (``postprocessor_args``). Where a config has ``APS_mode: True`` (ash, knn, react, scale, vim) the
  OpenOOD evaluator searches ``postprocessor_sweep`` on its ID/OOD *validation* sets and reports the
  best value; the preset takes the config's ``postprocessor_args`` value (no OOD data is used to
  choose it here).
- DICE: ``deeplearning-wisc/dice`` @ 8acfb8d5 (``demo-imagenet.sh``, ``demo-cifar.sh``).
- ASH: ``andrijazz/ash`` @ 0528fd21 (``config/imagenet_config.yml``, ``config/cifar10_config.yml``,
  ``config/cifar100_config.yml``, ``ash.py``).
- KNN: ``deeplearning-wisc/knn-ood`` @ 2afb2bbe (``run_imagenet.py``, ``run_cifar.py``).
- NNGuide: ``roomo7time/nnguide`` @ c123cac9 (``configs/detector/nnguide.yaml``,
  ``dataloaders/factory.py``).
- ReAct: ``deeplearning-wisc/react`` @ 2aa35d99 (``compute_threshold.py``).
- SCALE: ``kai422/SCALE`` @ 6a6ab911 (``configs/postprocessors/scale.yml``).
- SHE: ``zjs975584714/SHE_ood_detection`` @ e2cddb7a (``generate_stored_pattern.py``).
- ViM: ``haoqiwang/vim`` @ dabf9e5b (``benchmark.py``).
- GL-MCM: ``AtsuMiyai/GL-MCM`` @ 8708a084 (``scripts/eval_imagenet.sh``, ``eval_ood_detection.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oodscope.detectors.base import DetectorError

__all__ = ["GAPS", "NOT_SET", "PRESETS", "PRESET_NAMES", "Preset", "Setting", "check_preset", "preset_params",
           "preset_rows", "preset_sources", "resolve_params"]


@dataclass(frozen=True)
class Setting:
    """One parameter value of a preset and where it comes from (paper section or official file)."""

    value: Any
    source: str


@dataclass(frozen=True)
class Preset:
    """A protocol's parameter values: detector name -> parameter name -> :class:`Setting`."""

    name: str
    description: str
    detectors: dict[str, dict[str, Setting]]


_OPENOOD = "Jingkang50/OpenOOD configs/postprocessors/"

PRESETS: dict[str, Preset] = {
    "paper-imagenet": Preset(
        "paper-imagenet",
        "the authors' official ImageNet-1k (ResNet-50) settings",
        {
            "dice": {"p": Setting(70.0, "deeplearning-wisc/dice demo-imagenet.sh: ood_eval.py ... --p 70")},
            "ash_p": {"percentile": Setting(65.0, "andrijazz/ash ash.py: def ash_p(x, percentile=65)")},
            "ash_b": {"percentile": Setting(65.0, "andrijazz/ash ash.py: def ash_b(x, percentile=65)")},
            "ash_s": {"percentile": Setting(90.0, "andrijazz/ash config/imagenet_config.yml: method ash_s@90")},
            "knn": {
                "k": Setting(1000, "deeplearning-wisc/knn-ood run_imagenet.py: for K in [1000]"),
                "subsample": Setting(1.0, "deeplearning-wisc/knn-ood run_imagenet.py: ALPHA = 1.00"),
            },
            "nnguide": {
                "k": Setting(10, "roomo7time/nnguide configs/detector/nnguide.yaml: knn_k: 10"),
                "subsample": Setting(0.01, "roomo7time/nnguide dataloaders/factory.py: "
                                     "get_train_dataloader(..., bankset_ratio=0.01)"),
            },
            "react": {"percentile": Setting(90.0, "deeplearning-wisc/react compute_threshold.py: "
                                            "np.percentile(activation_log.flatten(), 90)")},
            "scale": {"percentile": Setting(85.0, "kai422/SCALE configs/postprocessors/scale.yml: percentile: 85")},
            "she": {"correct_only": Setting(True, "zjs975584714/SHE_ood_detection generate_stored_pattern.py "
                                            "generate_avg_feature: correctly predicted samples of each class")},
            "glmcm": {"local_weight": Setting(0.5, "AtsuMiyai/GL-MCM scripts/eval_imagenet.sh: --lambda_local 0.5")},
        },
    ),
    "paper-cifar": Preset(
        "paper-cifar",
        "the authors' official CIFAR-10/100 settings",
        {
            "dice": {"p": Setting(90.0, "deeplearning-wisc/dice demo-cifar.sh: ood_eval.py --in-dataset CIFAR-10 "
                                  "--p 90 (and CIFAR-100)")},
            "ash_s": {"percentile": Setting(95.0, "andrijazz/ash config/cifar10_config.yml and "
                                            "config/cifar100_config.yml: method ash_s@95")},
            "knn": {
                "k": Setting(50, "deeplearning-wisc/knn-ood run_cifar.py: for K in [50]"),
                "subsample": Setting(1.0, "deeplearning-wisc/knn-ood run_cifar.py: index.add(ftrain), "
                                     "the whole training set"),
            },
            "react": {"percentile": Setting(90.0, "deeplearning-wisc/react compute_threshold.py (--in-dataset "
                                            "CIFAR-100 or imagenet): np.percentile(activation_log.flatten(), 90)")},
            "scale": {"percentile": Setting(85.0, "kai422/SCALE configs/postprocessors/scale.yml: percentile: 85 "
                                            "(one config for CIFAR and ImageNet)")},
            "she": {"correct_only": Setting(True, "zjs975584714/SHE_ood_detection generate_stored_pattern.py "
                                            "(the CIFAR script): correctly predicted samples of each class")},
        },
    ),
    "openood-v1.5": Preset(
        "openood-v1.5",
        "OpenOOD v1.5 postprocessor configs (postprocessor_args; no APS search)",
        {
            "dice": {"p": Setting(90.0, _OPENOOD + "dice.yml: p: 90")},
            "ash_b": {"percentile": Setting(90.0, _OPENOOD + "ash.yml: percentile: 90 (OpenOOD's ASH is ASH-B: "
                                            "openood/networks/ash_net.py forward_threshold calls ash_b)")},
            "knn": {
                "k": Setting(50, _OPENOOD + "knn.yml: K: 50"),
                "subsample": Setting(1.0, "Jingkang50/OpenOOD openood/postprocessors/knn_postprocessor.py: "
                                     "the bank is every image of id_loader_dict['train']"),
            },
            "nnguide": {
                "k": Setting(100, _OPENOOD + "nnguide.yml: K: 100"),
                "subsample": Setting(0.01, _OPENOOD + "nnguide.yml: alpha: 0.01"),
            },
            "react": {"percentile": Setting(90.0, _OPENOOD + "react.yml: percentile: 90")},
            "scale": {"percentile": Setting(85.0, _OPENOOD + "scale.yml: percentile: 85")},
            "vim": {"dim": Setting(256, _OPENOOD + "vim.yml: dim: 256 (scripts/ood/vim/imagenet_test_ood_vim.sh "
                                   "passes --postprocessor.postprocessor_args.dim 1000 for ImageNet)")},
            "she": {"correct_only": Setting(True, "Jingkang50/OpenOOD openood/postprocessors/she_postprocessor.py: "
                                            "mask = labels == i and preds == i; " + _OPENOOD
                                            + "she.yml: metric: inner_product")},
            "odin": {
                "temperature": Setting(1000.0, _OPENOOD + "odin.yml: temperature: 1000"),
                "epsilon": Setting(0.0014, _OPENOOD + "odin.yml: noise: 0.0014"),
            },
        },
    ),
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)

#: (preset, detector) -> why the detector is left out (it keeps its class defaults).
NOT_SET: dict[tuple[str, str], str] = {
    ("paper-imagenet", "vim"): "the class default dim=None is the official rule of haoqiwang/vim benchmark.py "
                               "(1000 for >= 2048-d features, 512 for >= 768-d, else d // 2), capped below the "
                               "fit-set size",
    ("paper-cifar", "ash_p"): "no official CIFAR setting of ASH-P in andrijazz/ash (its configs run ash_s)",
    ("paper-cifar", "ash_b"): "no official CIFAR setting of ASH-B in andrijazz/ash (its configs run ash_s)",
    ("paper-cifar", "nnguide"): "roomo7time/nnguide runs CIFAR for debugging only (README)",
    ("paper-cifar", "vim"): "the class default dim=None gives d // 2 for CIFAR-width features, as "
                            "haoqiwang/vim benchmark.py",
    ("paper-cifar", "glmcm"): "GL-MCM has no CIFAR protocol; for COCO / VOC its official value is "
                              "local_weight=1.0 (eval_ood_detection.py default --lambda_local 1.0)",
    ("openood-v1.5", "ash_p"): "OpenOOD v1.5 implements only ASH-B",
    ("openood-v1.5", "ash_s"): "OpenOOD v1.5 implements only ASH-B",
    ("openood-v1.5", "glmcm"): "not in OpenOOD v1.5",
}


#: (preset, detector) -> what the official protocol also does that no parameter of the detector expresses.
GAPS: dict[tuple[str, str], str] = {
    ("paper-imagenet", "nnguide"): "the official ResNet-50 also clips the penultimate features at their ID 95th "
                                   "percentile before NNGuide (roomo7time/nnguide configs/model/resnet50-react.yaml "
                                   "react_percentile: 0.95, model_engines/resnet50_react.py), a change of the backbone "
                                   "that nnguide has no parameter for",
}


def check_preset(preset: str) -> Preset:
    """The :class:`Preset` named ``preset``; an unknown name is a :class:`DetectorError` listing the valid ones."""
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise DetectorError(f"unknown preset {preset!r}; presets: {', '.join(PRESET_NAMES)}") from None


def preset_params(preset: str | None, detector: str) -> dict[str, Any]:
    """The parameter values ``preset`` gives ``detector`` (empty for None or a detector it does not list)."""
    if preset is None:
        return {}
    return {k: s.value for k, s in check_preset(preset).detectors.get(detector, {}).items()}


def preset_sources(preset: str, detector: str) -> dict[str, str]:
    """Parameter name -> the source of its value in ``preset`` for ``detector``."""
    return {k: s.source for k, s in check_preset(preset).detectors.get(detector, {}).items()}


def resolve_params(detector: str, preset: str | None, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """``detector``'s parameters under ``preset``: the preset's values, then ``params`` on top (explicit wins)."""
    return preset_params(preset, detector) | dict(params or {})


def preset_rows(preset: str | None = None) -> list[dict[str, Any]]:
    """The table as rows (preset, detector, parameter, value, source), for listings and docs."""
    names = PRESET_NAMES if preset is None else (check_preset(preset).name,)
    return [{"preset": name, "detector": det, "parameter": param, "value": s.value, "source": s.source}
            for name in names for det, settings in PRESETS[name].detectors.items()
            for param, s in settings.items()]
