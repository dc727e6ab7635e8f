"""``oodscope audit prompts|corruptions``: robustness audits of OOD detectors.

``prompts``: re-run a zero-shot detector with many phrasings of the ID prompts (image features are
extracted once) and report the AUROC / FPR@95 spread across phrasings. ``corruptions``: corrupt ID
and/or OOD images (ImageNet-C style, severities 0-5) and report each detector's AUROC by severity.
Both write ``audit.json``, CSV tables and a PNG plot into ``-o DIR`` and print a summary table.
DATA is what ``oodscope extract`` takes, a registered data-set name (``fashion-mnist-ood/id``,
``fashion-mnist-ood/near``, ``digits``, ``textiles``, ...; see :mod:`oodscope.io.registry`), or
``fashion-mnist-ood:id`` / ``fashion-mnist-ood:near`` (``…:id:train`` for training images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oodscope.cli.commands._common import add_backbone_options, default_cache_dir


def register(sub) -> None:
    parser = sub.add_parser("audit", help="robustness audits: prompt sensitivity, image corruptions")
    audits = parser.add_subparsers(dest="audit", metavar="AUDIT")

    prompts = audits.add_parser("prompts", help="AUROC spread of a zero-shot detector across prompt phrasings")
    _common_options(prompts, default_backbone="conse:effnet-lite0")
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
    _common_options(corr, default_backbone="conse:effnet-lite0")
    corr.add_argument("--method", "--detectors", dest="detectors", default="mcm",
                      help="comma-separated detectors (default mcm); feature-space ones need --fit")
    corr.add_argument("--params", default=None,
                      help='JSON of detector parameters by detector name, e.g. \'{"knn": {"k": 10}}\'')
    corr.add_argument("--fit", default=None, metavar="DATA", help="clean ID images to fit non-zero-shot detectors on")
    corr.add_argument("--fit-limit", type=int, default=None, help="a seeded random subset of N fit images")
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
    return 2


def _common_options(parser: argparse.ArgumentParser, default_backbone: str) -> None:
    parser.add_argument("--backbone", default=default_backbone, help=f"backbone spec (default {default_backbone})")
    parser.add_argument("--classes", default=None,
                        help="comma-separated ID class names (default: the ID data's class names)")
    parser.add_argument("--id", dest="id_data", required=False, metavar="DATA", help="in-distribution images")
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=DATA",
                        help="an OOD set (repeatable); NAME= may be left out")
    parser.add_argument("-o", "--output", type=Path, required=False, help="output directory")
    parser.add_argument("--limit", type=int, default=None,
                        help="use a seeded random subset of at most N images of each set")
    parser.add_argument("--seed", type=int, default=0, help="seed of --limit subsets and corruptions (default 0)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="feature cache directory (default $OODSCOPE_CACHE or ~/.cache/oodscope/features)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backbone_options(parser)


def resolve_data(spec: str):
    """A dataset from ``oodscope extract``'s DATA syntax, a registered data-set name
    (:mod:`oodscope.io.registry`, e.g. ``fashion-mnist-ood/id``), or
    ``fashion-mnist-ood:id|near[:train|test]``."""
    from oodscope.cli.commands.extract import resolve_source

    if not Path(spec).exists():
        parts = spec.split(":")
        if parts[0] == "fashion-mnist-ood":
            from oodscope.io import fashion_mnist_ood

            part = parts[1] if len(parts) > 1 else "id"
            split = parts[2] if len(parts) > 2 else "test"
            if part not in ("id", "near"):
                raise SystemExit(f"oodscope audit: {spec}: use fashion-mnist-ood:id or fashion-mnist-ood:near")
            data = fashion_mnist_ood(split)
            return data.id if part == "id" else data.near_ood
        try:
            from oodscope.io import registry as datasets
        except ImportError:
            datasets = None
        if datasets is not None and spec in {d.name for d in datasets.list_datasets()}:
            return datasets.get_dataset(spec)
    return resolve_source(spec)


def _limited(source, limit: int | None, seed: int):
    import numpy as np

    from oodscope.io import Subset

    if limit is None or limit >= len(source):
        return source
    if limit < 1:
        raise ValueError("--limit must be a positive number")
    picked = np.sort(np.random.default_rng(seed).choice(len(source), size=limit, replace=False))
    return Subset(source, picked)


def _ood_sets(args) -> dict:
    if not args.ood:
        raise SystemExit("oodscope audit: at least one --ood NAME=DATA is needed")
    out = {}
    for item in args.ood:
        name, sep, data = item.partition("=")
        if not sep:
            name, data = Path(item).name or item, item
        if name in out:
            raise SystemExit(f"oodscope audit: OOD set name {name!r} is given twice")
        out[name] = _limited(resolve_data(data), args.limit, args.seed)
    return out


def _inputs(args):
    if not args.id_data:
        raise SystemExit("oodscope audit: --id DATA is needed")
    if args.output is None:
        raise SystemExit("oodscope audit: -o DIR is needed")
    id_source = _limited(resolve_data(args.id_data), args.limit, args.seed)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    return id_source, _ood_sets(args), classes


def _backbone(args):
    from oodscope.backbones import create

    return create(args.backbone, device=args.device)


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
            raise SystemExit(f"oodscope audit: --synonyms expects CLASS=NAME|NAME or a JSON file, got {item!r}")
        out.setdefault(name.strip(), []).extend(n.strip() for n in names.split("|") if n.strip())
    return out


def run_prompts(args: argparse.Namespace) -> int:
    from oodscope.evaluation.audit import (
        PromptVariant,
        plot_prompt_sensitivity,
        prompt_sensitivity,
        prompt_variants,
    )

    id_source, ood, classes = _inputs(args)
    classes = classes or (list(id_source.class_names) if id_source.class_names else None)
    if not classes:
        raise SystemExit("oodscope audit: --classes is needed (the ID data has no class names)")
    variants = prompt_variants(classes, domain=args.domain, synonyms=_synonyms(args.synonyms) or None,
                               wordnet=not args.no_wordnet)
    if args.templates is not None:
        extra = [t.strip() for t in args.templates.read_text(encoding="utf-8").splitlines()
                 if t.strip() and not t.startswith("#")]
        variants += [PromptVariant(f"file-{k:02d}", "custom", t, (t,)) for k, t in enumerate(extra, 1)]
    backbone = _backbone(args)
    result = prompt_sensitivity(
        backbone, id_source, ood, classes, method=args.method, variants=variants,
        cache_dir=args.cache or default_cache_dir(), batch_size=args.batch_size, num_workers=args.workers,
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
    return 0


def run_corruptions(args: argparse.Namespace) -> int:
    from oodscope.evaluation.audit import corruption_robustness, plot_corruption_curves
    from oodscope.evaluation.corruptions import CORRUPTION_NAMES, FAMILIES

    if args.list_corruptions:
        for name in CORRUPTION_NAMES:
            print(f"{name:<18} {FAMILIES[name]}")
        return 0
    id_source, ood, classes = _inputs(args)
    corruptions = list(CORRUPTION_NAMES) if args.corruptions == "all" else [
        c.strip() for c in args.corruptions.split(",") if c.strip()]
    try:
        severities = [int(s) for s in args.severities.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"oodscope audit: --severities must be integers, got {args.severities!r}") from None
    params = json.loads(args.params) if args.params else {}
    detectors = {}
    for name in (d.strip() for d in args.detectors.split(",") if d.strip()):
        detectors[name] = (name, params.get(name, {}))
    fit = _limited(resolve_data(args.fit), args.fit_limit, args.seed) if args.fit else None
    backbone = _backbone(args)
    result = corruption_robustness(
        backbone, detectors, id_source, ood, corruptions=corruptions, severities=severities,
        apply_to=args.apply_to, id_fit=fit, classes=classes, seed=args.seed,
        work_size=args.work_size or None, cache_dir=args.cache or default_cache_dir(),
        batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet,
    )
    result.save(args.output)
    if not args.no_plot:
        plot_corruption_curves(result, args.output / "corruption_curves.png")
    print(f"\n{result.backbone_id}: AUROC (mean over OOD sets {list(result.n_ood)}) by severity, "
          f"{result.apply_to} corrupted, {result.n_id} ID images")
    print(result.table())
    if result.n_failed:
        print(f"{result.n_failed} image(s) could not be read and were left out", file=sys.stderr)
    print(f"results in {args.output}")
    _maybe_report(args.output)
    return 0
