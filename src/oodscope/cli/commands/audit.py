"""``oodscope audit prompts|corruptions``: robustness audits of OOD detectors.

``prompts``: re-run a zero-shot detector with many phrasings of the ID prompts (image features are
extracted once) and report the AUROC / FPR@95 spread across phrasings. ``corruptions``: corrupt ID
and/or OOD images (ImageNet-C style, severities 0-5) and report each detector's AUROC by severity.
Both write ``audit.json``, CSV tables and a PNG plot into ``-o DIR`` and print a summary table
(a directory holding an earlier ``audit.json`` is written into, both audits can share one; any
other non-empty directory is refused unless ``--overwrite``). DATA is a data spec of
:func:`oodscope.io.resolve_images`: a folder, a list file, or a registered data set name
(``fashion-mnist-ood/id``, ``fashion-mnist-ood/id-fit``, ``fashion-mnist-ood/near``, ``digits``,
``textiles``, ...; ``oodscope datasets list``).

Exit codes: 0 = done; 2 = bad arguments, refused before any image is read (unknown detector,
backbone, corruption or data, a missing path, an invalid value, a detector that cannot run on the
backbone or without ``--fit``); 1 = the work failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oodscope.backbones import DEFAULT_ZERO_SHOT_BACKBONE
from oodscope.cli.commands._common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    UsageError,
    add_backbone_options,
    add_classes_option,
    add_max_pixels_option,
    add_overwrite_option,
    check_detector_params,
    check_output,
    checking,
    counted,
    default_cache_dir,
    needs_in_words,
    open_images,
)

HELP = "robustness audits: prompt sensitivity, image corruptions"
#: What an earlier audit leaves in its output directory (written into without --overwrite).
AUDIT_MARKERS = ("audit.json",)


def register(sub) -> None:
    parser = sub.add_parser("audit", help=HELP, description=__doc__.split("\n\n")[0])
    audits = parser.add_subparsers(dest="audit", metavar="AUDIT")

    prompts = audits.add_parser("prompts", help="AUROC spread of a zero-shot detector across prompt phrasings")
    _common_options(prompts, default_backbone=DEFAULT_ZERO_SHOT_BACKBONE)
    prompts.add_argument("--method", default="mcm", help="zero-shot detector (default mcm)")
    prompts.add_argument("--domain", default=None,
                         help="domain word for context prompts, e.g. clothing ('a photo of a {}, a type of clothing.')")
    prompts.add_argument("--synonyms", action="append", default=[], metavar="CLASS=NAME|NAME",
                         help="alternative names of a class (repeatable), or a JSON file {class: [names]}")
    prompts.add_argument("--no-wordnet", action="store_true", help="no WordNet synonyms of the class names")
    prompts.add_argument("--templates", type=Path, default=None,
                         help="text file with extra templates to test, one per line, each containing {}")
    prompts.set_defaults(func=run_prompts)

    corr = audits.add_parser("corruptions", help="AUROC of detectors as images are corrupted (ImageNet-C style)")
    _common_options(corr, default_backbone=DEFAULT_ZERO_SHOT_BACKBONE)
    corr.add_argument("--method", "--detectors", dest="detectors", default="mcm",
                      help="comma-separated detectors (default mcm); feature-space ones need --fit")
    corr.add_argument("--params", default=None,
                      help='JSON of detector parameters by detector name, e.g. \'{"knn": {"k": 10}}\'')
    corr.add_argument("--fit", default=None, metavar="DATA", help="clean ID images to fit non-zero-shot detectors on")
    corr.add_argument("--fit-limit", type=counted(1), default=None, help="a seeded random subset of N fit images")
    corr.add_argument("--corruptions", default="gaussian_noise,defocus_blur,fog,jpeg_compression",
                      help="comma-separated corruptions, or 'all' (see --list-corruptions)")
    corr.add_argument("--severities", default="0,1,3,5", help="comma-separated severities in 0..5 (default 0,1,3,5)")
    corr.add_argument("--apply-to", choices=("both", "id", "ood"), default="both",
                      help="corrupt ID and OOD images (default), or only one side")
    corr.add_argument("--work-size", type=int, default=224,
                      help="upsample smaller images to this shorter side before corrupting (0 = native size)")
    corr.add_argument("--list-corruptions", action="store_true", help="print the available corruptions and exit")
    corr.set_defaults(func=run_corruptions)
    parser.set_defaults(func=lambda args: _no_audit(parser))


def _no_audit(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def _common_options(parser: argparse.ArgumentParser, default_backbone: str) -> None:
    parser.add_argument("--backbone", default=default_backbone, help=f"backbone spec (default {default_backbone})")
    add_classes_option(parser, "ID class names (default: the ID data's class names)")
    parser.add_argument("--id", dest="id_data", required=False, metavar="DATA", help="in-distribution images")
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=DATA",
                        help="an OOD set (repeatable); NAME= may be left out")
    parser.add_argument("-o", "--output", type=Path, required=False, help="output directory")
    add_overwrite_option(parser, "write into a directory that holds other files")
    parser.add_argument("--limit", type=counted(1), default=None,
                        help="use a seeded random subset of at most N images of each set")
    parser.add_argument("--seed", type=int, default=0, help="seed of --limit subsets and corruptions (default 0)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="feature cache directory (default $OODSCOPE_CACHE or ~/.cache/oodscope/features)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backbone_options(parser)
    add_max_pixels_option(parser)


def _limited(source, limit: int | None, seed: int):
    import numpy as np

    from oodscope.io import Subset

    if limit is None or limit >= len(source):
        return source
    picked = np.sort(np.random.default_rng(seed).choice(len(source), size=limit, replace=False))
    return Subset(source, picked)


def _ood_sets(args) -> dict:
    if not args.ood:
        raise UsageError("at least one --ood NAME=DATA is needed")
    out = {}
    for item in args.ood:
        name, sep, data = item.partition("=")
        if not sep:
            name, data = Path(item).name or item, item
        if name in out:
            raise UsageError(f"OOD set name {name!r} is given twice")
        out[name] = _limited(open_images(data, f"--ood {item}"), args.limit, args.seed)
    return out


def _inputs(args):
    """ID images, OOD sets, the class names and the backbone, checked before any image is read."""
    from oodscope.backbones import create

    if not args.id_data:
        raise UsageError("--id DATA is needed")
    if args.output is None:
        raise UsageError("-o DIR is needed")
    check_output(args.output, overwrite=args.overwrite, kind="dir", markers=AUDIT_MARKERS, what="the audit")
    id_source = _limited(open_images(args.id_data, "--id"), args.limit, args.seed)
    ood = _ood_sets(args)
    classes = args.classes or (list(id_source.class_names) if id_source.class_names else None)
    backbone = create(args.backbone, device=args.device)  # an unknown spec is refused here
    return id_source, ood, classes, backbone


def _check_runs(name: str, params: dict, classes, backbone, backbone_spec: str, *, fit: bool,
                fit_labelled: bool) -> None:
    """Refuse a detector that could not run: unknown parameters, no class names, no text encoder, no --fit."""
    from oodscope.backbones.base import is_vision_language
    from oodscope.detectors.fitting import build_detector, fit_problems

    check_detector_params(name, params)
    detector = build_detector(name, params, classes)
    problems = fit_problems(detector, features=fit, labels=fit_labelled, text_encoder=is_vision_language(backbone),
                            classifier=callable(getattr(backbone, "classifier_parts", None)))
    if problems:
        raise UsageError(f"{name} ({detector.kind.label}) cannot run on {backbone_spec} here: it needs "
                         f"{needs_in_words(problems, '--fit DATA')}")


def _maybe_report(output: Path) -> None:
    """Build the HTML report from the results directory when oodscope.reports offers it."""
    try:
        from oodscope import reports
    except ImportError:
        return
    writer = getattr(reports, "write_audit_report", None)
    if callable(writer):
        path = writer(output)
        print(f"report: {path}")


def _synonyms(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        if Path(item).is_file():
            loaded = json.loads(Path(item).read_text(encoding="utf-8"))
            for k, v in loaded.items():
                out.setdefault(k, []).extend([v] if isinstance(v, str) else list(v))
            continue
        name, sep, names = item.partition("=")
        if not sep:
            raise UsageError(f"--synonyms expects CLASS=NAME|NAME or a JSON file, got {item!r}")
        out.setdefault(name.strip(), []).extend(n.strip() for n in names.split("|") if n.strip())
    return out


def run_prompts(args: argparse.Namespace) -> int:
    from oodscope.evaluation.audit import (
        PromptVariant,
        plot_prompt_sensitivity,
        prompt_sensitivity,
        prompt_variants,
    )

    with checking():
        id_source, ood, classes, backbone = _inputs(args)
        if not classes:
            raise UsageError("--classes is needed (the ID data has no class names)")
        _check_runs(args.method, {}, classes, backbone, args.backbone, fit=False, fit_labelled=False)
        from oodscope.detectors.fitting import class_needs

        if not class_needs(args.method).classes:
            raise UsageError(f"--method {args.method}: the prompt audit needs a detector built from class names "
                             "(mcm, glmcm, neglabel, ...)")
        synonyms = _synonyms(args.synonyms) or None
        extra = []
        if args.templates is not None:
            if not args.templates.is_file():
                raise UsageError(f"--templates {args.templates}: no such file")
            extra = [t.strip() for t in args.templates.read_text(encoding="utf-8").splitlines()
                     if t.strip() and not t.startswith("#")]
            bad = [t for t in extra if "{}" not in t]
            if bad:
                raise UsageError(f"--templates {args.templates}: every template needs {{}} for the class name; "
                                 f"not: {bad[0]!r}")
    variants = prompt_variants(classes, domain=args.domain, synonyms=synonyms, wordnet=not args.no_wordnet)
    variants += [PromptVariant(f"file-{k:02d}", "custom", t, (t,)) for k, t in enumerate(extra, 1)]
    result = prompt_sensitivity(
        backbone, id_source, ood, classes, method=args.method, variants=variants,
        cache_dir=args.cache or default_cache_dir(), batch_size=args.batch_size, num_workers=args.num_workers,
        progress=not args.quiet, seed=args.seed,
    )
    result.save(args.output)
    if not args.no_plot:
        plot_prompt_sensitivity(result, args.output / "prompt_sensitivity.png")
    print(f"\n{result.method} on {result.backbone_id}: {len(result.variants)} prompt phrasings, "
          f"{result.n_id} ID images, OOD sets {result.n_ood} (AUROC)")
    print(result.table())
    best = max(result.variants, key=lambda v: v["mean_auroc"])
    worst = min(result.variants, key=lambda v: v["mean_auroc"])
    print(f"best on average:  {best['label']!r} ({best['mean_auroc']:.3f})")
    print(f"worst on average: {worst['label']!r} ({worst['mean_auroc']:.3f})")
    print(f"results in {args.output}")
    _maybe_report(args.output)
    return _unreadable(result.n_failed)


def run_corruptions(args: argparse.Namespace) -> int:
    from oodscope.evaluation.audit import corruption_robustness, plot_corruption_curves
    from oodscope.evaluation.corruptions import CORRUPTION_NAMES, FAMILIES

    if args.list_corruptions:
        for name in CORRUPTION_NAMES:
            print(f"{name:<18} {FAMILIES[name]}")
        return EXIT_OK
    with checking():
        corruptions = list(CORRUPTION_NAMES) if args.corruptions == "all" else [
            c.strip() for c in args.corruptions.split(",") if c.strip()]
        unknown = [c for c in corruptions if c not in CORRUPTION_NAMES]
        if unknown or not corruptions:
            raise UsageError(f"unknown corruption(s) {', '.join(unknown) or '(none given)'}; available: "
                             f"{', '.join(CORRUPTION_NAMES)} (--list-corruptions)")
        try:
            severities = [int(s) for s in args.severities.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--severities must be integers in 0..5, got {args.severities!r}") from None
        if not severities or any(not 0 <= s <= 5 for s in severities):
            raise UsageError(f"--severities must be integers in 0..5, got {args.severities!r}")
        try:
            params = json.loads(args.params) if args.params else {}
        except json.JSONDecodeError as err:
            raise UsageError(f"--params is not JSON ({err.msg}): {args.params!r}") from None
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            raise UsageError('--params expects {"detector": {"parameter": value, ...}, ...}')
        names = [d.strip() for d in args.detectors.split(",") if d.strip()]
        if not names:
            raise UsageError("--detectors: no detector given")
        stray = sorted(set(params) - set(names))
        if stray:
            raise UsageError(f"--params for {', '.join(stray)}, which --detectors does not name")
        id_source, ood, classes, backbone = _inputs(args)
        fit = _limited(open_images(args.fit, "--fit"), args.fit_limit, args.seed) if args.fit else None
        fit_labelled = fit is not None and fit.labels is not None and bool((fit.labels >= 0).all())
        for name in names:
            _check_runs(name, dict(params.get(name, {})), classes, backbone, args.backbone, fit=fit is not None,
                        fit_labelled=fit_labelled)
    detectors = {name: (name, params.get(name, {})) for name in names}
    result = corruption_robustness(
        backbone, detectors, id_source, ood, corruptions=corruptions, severities=severities,
        apply_to=args.apply_to, id_fit=fit, classes=classes, seed=args.seed,
        work_size=args.work_size or None, cache_dir=args.cache or default_cache_dir(),
        batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.quiet,
    )
    result.save(args.output)
    if not args.no_plot:
        plot_corruption_curves(result, args.output / "corruption_curves.png")
    print(f"\n{result.backbone_id}: AUROC (mean over OOD sets {list(result.n_ood)}) by severity, "
          f"{result.apply_to} corrupted, {result.n_id} ID images")
    print(result.table())
    print(f"results in {args.output}")
    _maybe_report(args.output)
    return _unreadable(result.n_failed)


def _unreadable(n_failed: int) -> int:
    if n_failed:
        print(f"{n_failed} image(s) could not be read and were left out", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK
