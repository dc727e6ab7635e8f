"""``oodscope fit``: fit (and calibrate) an OOD model, and write it to a directory.

Zero-shot methods (mcm, glmcm, neglabel, eoe, clipn) learn from the ID class names (``--classes``)
alone: without ID images the model written gives scores only; with ID images to calibrate on
(``--calibration-dir``, or ``--id-dir``: nothing is fitted on them) it also gives p-values and
decisions. Feature-space methods (knn, mahalanobis, ...) fit on ``--id-dir`` (class sub-folders)
and calibrate on a held-out part of it (``--calibration-fraction``, stratified and seeded) or on
``--calibration-dir``; calibrating on the fit images is refused. Image anomaly methods (patchcore,
padim, ...) fit the same way on a folder of good images (no classes needed); ``oodscope score
--maps DIR`` then writes their maps (docs/anomaly.md).

The model's options (``--alpha``, ``--prediction-sets``, ``--head``, ...) are built from
:data:`oodscope.pipeline.options.MODEL_OPTIONS`, the definitions of OODModel's settings. Everything
is checked before any image is read: the method and its parameters (``--param``; an unknown one is
refused with the method's parameters listed; ``--preset NAME``, a named protocol of
:mod:`oodscope.detectors.presets`, gives their values first — an unknown name is refused with the
valid ones), the backbone (created, and probed with one blank
image for the features it provides), what the method needs from it (a text encoder, labels, ...),
the paths, the values and whether there are enough calibration images for ``--alpha``.

Exit codes: 0 = model written; 3 = model written, but some images could not be read (skipped,
listed); 2 = bad arguments, nothing read or written (unknown method / backbone / parameter, a
missing path, an invalid value or combination, ``-o`` not empty without ``--overwrite``); 1 =
nothing written, the work failed (weights not installed, too few readable calibration images, ...).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodscope.cli.commands._common import (
    CLASSES_SYNTAX,
    EXIT_OK,
    EXIT_SOME_FAILED,
    UsageError,
    add_classes_option,
    add_max_pixels_option,
    add_model_options,
    add_overwrite_option,
    check_detector_params,
    check_output,
    checking,
    default_cache_dir,
    needs_in_words,
    open_images,
    parse_params,
    print_failures,
)

HELP = "fit + calibrate an OOD model (backbone, detector, conformal threshold) into a directory"


def register(sub) -> None:
    parser = sub.add_parser(
        "fit", help=HELP,
        description="Fit a detector on ID data (or on class names for zero-shot methods), calibrate conformal "
        "p-values / a threshold on held-out ID images, and save the model. Exit codes: 0 written, 1 failed, "
        "2 bad arguments (nothing read), 3 written but some images were unreadable.",
    )
    parser.add_argument("--backbone", required=True, help="backbone spec, e.g. effnet-lite0, conse:effnet-lite0 "
                        "(`oodscope backbones`)")
    parser.add_argument("--method", required=True, help="detector name (`oodscope detectors` lists them)")
    add_classes_option(parser, "ID class names for zero-shot methods")
    parser.add_argument("--id-dir", default=None, metavar="DATA",
                        help="ID images: a folder with one sub-folder per class (a list file or registered data "
                        "set also works)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--calibration-dir", default=None, metavar="DATA",
                       help="held-out ID images used only for calibration (class sub-folders for prediction sets)")
    add_model_options(parser, not_given=("calibration_fraction",), group=group, in_group=("calibration_fraction",))
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="detector parameter, repeatable; VALUE is read as JSON when it parses (k=5, "
                        "templates=ensemble, index_params='{\"nlist\": 64}'); `oodscope detectors NAME` lists them")
    parser.add_argument("--no-cache", action="store_true", help="do not use the feature cache ($OODSCOPE_CACHE)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="model directory to write")
    add_overwrite_option(parser, "a model there is replaced, other files are kept")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_max_pixels_option(parser)
    parser.set_defaults(func=run)


@dataclass
class _Plan:
    """What ``run`` does, once every argument has been checked."""

    model: Any
    classes: list[str] | None
    id_data: Any
    calibration: Any


def run(args: argparse.Namespace) -> int:
    with checking():
        plan = check(args)
    model = plan.model
    if model.zero_shot:
        model.fit(classes=plan.classes,
                  calibration=plan.calibration if plan.calibration is not None else plan.id_data)
    else:
        model.fit(plan.id_data, calibration=plan.calibration, calibration_fraction=args.calibration_fraction)
    model.save(args.output, overwrite=True)  # -o was checked before fitting
    print(model.describe())
    print(f"saved to {args.output}")
    if not model.is_calibrated:
        print(f"oodscope fit: note: {args.output} gives scores only: p-values and OOD decisions need calibration "
              f"(oodscope fit ... --calibration-dir ID_IMAGES)", file=sys.stderr)
    fit, cal = model.info_.get("fit") or {}, model.info_.get("calibration") or {}
    failed = fit.get("failed", 0) + cal.get("failed", 0)
    if failed:
        print_failures(fit.get("failures", []) + cal.get("failures", []), failed, sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def check(args: argparse.Namespace) -> _Plan:
    """Every check that needs no image read; raises :class:`UsageError` (exit 2)."""
    from oodscope.backbones.base import is_vision_language
    from oodscope.calibration import min_calibration_size
    from oodscope.detectors.fitting import build_detector, fit_problems
    from oodscope.pipeline import OODModel

    params = parse_params(args.param)
    check_detector_params(args.method, params)
    check_output(args.output, overwrite=args.overwrite, kind="dir", what="the model")
    model = OODModel(
        args.backbone, args.method, params, preset=args.preset, alpha=args.alpha, set_alpha=args.set_alpha,
        prediction_sets=args.prediction_sets, head=args.head, seed=args.seed,
        backbone_options={"device": args.device} if args.device else None,
        cache_dir=None if args.no_cache else default_cache_dir(),
        batch_size=args.batch_size, num_workers=args.num_workers,
    )
    method, classes = args.method, args.classes
    kind = model.kind.label
    if model.zero_shot:
        if args.calibration_fraction is not None:
            raise UsageError(f"{method} is {kind}: every ID image calibrates it; drop --calibration-fraction")
        if args.id_dir and args.calibration_dir:
            raise UsageError(f"{method} is {kind} and learns nothing from images: give the ID images once, "
                             "with --calibration-dir")
    else:
        if classes is not None:
            raise UsageError(f"--classes is for zero-shot methods; {method} ({kind}) takes the classes from the "
                             "sub-folders of --id-dir")
        if not args.id_dir:
            if model.kind.value == "anomaly":  # fitted on a folder of good images, no classes
                raise UsageError(f"{method} ({kind}) learns from good (normal) images: give --id-dir (a folder of "
                                 "them)")
            raise UsageError(f"{method} ({kind}) learns from ID images: give --id-dir (one sub-folder per class)")
    if classes is not None and len(classes) < 2:
        raise UsageError(f"--classes needs at least 2 class names, got {classes}")

    labels_needed = _needs_labels(method)
    id_data = open_images(args.id_dir, "--id-dir", classes_expected=True) if args.id_dir else None
    calibration = open_images(args.calibration_dir, "--calibration-dir") if args.calibration_dir else None
    if id_data is not None and calibration is not None:
        fit_items = {id_data.item_id(i) for i in range(len(id_data))}
        shared = [calibration.item_id(i) for i in range(len(calibration)) if calibration.item_id(i) in fit_items]
        if shared:
            raise UsageError(f"--calibration-dir shares {len(shared)} image(s) with --id-dir (e.g. {shared[0]}): "
                             "calibration images must be held out from the images the detector is fitted on")
    if id_data is not None and labels_needed and (id_data.labels is None or (id_data.labels < 0).any()):
        raise UsageError(f"{method} ({kind}) needs the class of every ID image: --id-dir expects one sub-folder "
                         f"per class, and {args.id_dir} has images without one")
    if model.zero_shot and classes is None:
        given = calibration if calibration is not None else id_data
        if given is None or not given.class_names:
            raise UsageError(f"{method} is {kind}: give the ID class names with --classes ({CLASSES_SYNTAX}), "
                             "or ID images in class sub-folders")
        classes = list(given.class_names)

    # The method's parameters in full (required ones, class names) and what it needs from the backbone.
    folder_classes = id_data.class_names if id_data is not None else None
    detector = build_detector(method, model.method_params, classes if model.zero_shot else folder_classes,
                              preset=model.preset)
    backbone = model.backbone  # created here: an unknown spec is refused before any image is read
    labelled = id_data is not None and id_data.labels is not None and bool((id_data.labels >= 0).all())
    problems = fit_problems(detector, features=id_data is not None, labels=labelled,
                            text_encoder=is_vision_language(backbone),
                            classifier=callable(getattr(backbone, "classifier_parts", None)))
    if problems:
        raise UsageError(f"{method} ({kind}) cannot run on {args.backbone}: it needs "
                         f"{needs_in_words(problems, '--id-dir')}")
    provided = _probe_fields(backbone)
    if provided is not None:
        missing = [f for f in detector.fields() if f not in provided]
        if missing:
            raise UsageError(f"{method} reads {', '.join(missing)} from the backbone's features, but "
                             f"{args.backbone} provides only {', '.join(sorted(provided))}; choose a backbone that "
                             "provides them (a classifier such as effnet-lite0 for logit-based methods)")
    if args.head == "linear_probe" and model.zero_shot:
        raise UsageError(f"--head linear_probe needs labelled fit images; {method} is {kind} and fits on none")
    if args.head == "linear_probe" and not labelled:
        raise UsageError("--head linear_probe needs ID images in class sub-folders (--id-dir)")
    if args.head == "zeroshot" and not is_vision_language(backbone):
        raise UsageError(f"--head zeroshot needs a vision-language backbone (a text encoder); {args.backbone} "
                         "has none")
    if args.head == "logits" and provided is not None and "logits" not in provided:
        raise UsageError(f"--head logits needs a classifier backbone; {args.backbone} gives no logits")

    # Enough calibration images for alpha (a lower bound on what fitting would find).
    need = min_calibration_size(1.0 - model.alpha)
    if model.zero_shot:
        source, where = (calibration, "--calibration-dir") if calibration is not None else (id_data, "--id-dir")
        n_cal = None if source is None else len(source)
    elif calibration is not None:
        n_cal, where = len(calibration), "--calibration-dir"
    else:
        fraction = args.calibration_fraction if args.calibration_fraction is not None else model.calibration_fraction
        n_cal, where = _held_out(id_data.labels, len(id_data), fraction), "--calibration-fraction of --id-dir"
    if n_cal is not None and n_cal < need:
        raise UsageError(f"--alpha {model.alpha:g} needs at least {need} calibration images (n >= (1 - alpha) / "
                         f"alpha), {where} gives {n_cal}: give more ID images, or a larger --alpha")
    return _Plan(model=model, classes=classes, id_data=id_data, calibration=calibration)


def _needs_labels(method: str) -> bool:
    from oodscope.detectors.fitting import class_needs

    return class_needs(method).labels


def _held_out(labels, n: int, fraction: float) -> int:
    """How many images the stratified split would hold out (at most: duplicates count once)."""
    import numpy as np

    counts = [n] if labels is None else [int(c) for c in np.unique(labels, return_counts=True)[1]]
    out = 0
    for count in counts:
        if count >= 2:
            out += min(max(math.floor(fraction * count + 0.5), 1), count - 1)
    return out


def _probe_fields(backbone) -> set[str] | None:
    """The feature fields a backbone provides, from one blank image (None when it cannot be probed)."""
    try:
        from PIL import Image

        from oodscope.backbones.preprocess import preprocess

        spec = backbone.input_spec
        batch = preprocess([Image.new("RGB", (spec.size, spec.size), (128, 128, 128))], spec,
                           getattr(backbone, "device", "cpu"))
        return set(backbone.encode_images(batch).available()) - {"backbone_id", "class_names"}
    except Exception:  # noqa: BLE001 - a backbone that cannot be probed is checked when it runs
        return None
