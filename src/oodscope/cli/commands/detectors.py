"""``oodscope detectors [NAME]``: every registered detector, what it is and what it needs.

The listing gives each method's kind (``DetectorKind.label``: output-based, feature-space,
zero-shot, ...), what fitting it needs (ID features, labels, class names and a text encoder, the
classifier network), the feature fields it reads (``requires``), the paper it cites and its
parameters with their defaults (the keys ``--param`` / ``detector_params`` take). ``--json`` prints
the same as a list of objects; ``oodscope detectors NAME`` shows one method in full, with its
documentation. Each method also shows the values the named presets give it (``--preset`` of
``oodscope fit`` / ``bench``, :mod:`oodscope.detectors.presets`); ``oodscope detectors --presets``
prints the whole preset table with the source of every value. Exit codes: 0 = listed; 2 = unknown name.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from typing import Any

from oodscope.cli.commands._common import EXIT_OK, UsageError

HELP = "list the registered OOD detectors: kind, needs, paper, default parameters"

#: A citation: a venue and a year, an arXiv number, or oodscope's own (as the contract suite checks).
_CITATION = re.compile(
    r"\b(?:NeurIPS|NIPS|ICLR|ICML|CVPR|ICCV|ECCV|IJCV|TPAMI|AAAI|IJCAI|TMLR|WACV|BMVC|UAI|AISTATS|arXiv)\b"
    r"[^\n]{0,20}?\b(?:19|20)\d\d\b|arXiv:\d{4}\.\d{4,5}|oodscope's own"
)


def register(sub) -> None:
    parser = sub.add_parser("detectors", help=HELP, description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", default=None, help="one detector, shown in full")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--presets", action="store_true",
                        help="the named hyper-parameter presets: every value with its source")
    parser.set_defaults(func=run)


def describe(cls: type) -> dict[str, Any]:
    """What the listing shows of one detector class (JSON-able)."""
    from oodscope.detectors.base import parameters
    from oodscope.detectors.fitting import class_needs

    doc = _module_doc(cls)
    defaults = {}
    required = []
    for name, default in parameters(cls).items():
        if default is inspect.Parameter.empty:
            required.append(name)
        else:
            defaults[name] = _jsonable(default)
    return {
        "name": cls.name,
        "kind": cls.kind.value,
        "kind_label": cls.kind.label,
        "needs": class_needs(cls).describe(),
        "reads": list(cls.requires),
        "summary": doc.splitlines()[0].strip() if doc else "",
        "cites": _citation(doc + "\n\n" + _class_doc(cls)),
        "required": required,
        "defaults": defaults,
        "presets": _presets_of(cls.name),
    }


def _presets_of(name: str) -> dict[str, dict[str, Any]]:
    """Preset name -> the parameter values it gives detector ``name`` (presets that list it only)."""
    from oodscope.detectors.presets import PRESET_NAMES, preset_params

    return {p: {k: _jsonable(v) for k, v in values.items()}
            for p in PRESET_NAMES if (values := preset_params(p, name))}


def _print_presets(args: argparse.Namespace) -> int:
    """``--presets``: the table, one line per value with its source."""
    from oodscope.detectors.presets import GAPS, NOT_SET, PRESETS, preset_rows

    rows = preset_rows()
    if args.name is not None:
        rows = [r for r in rows if r["detector"] == args.name]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for name, preset in PRESETS.items():
        print(f"{name}: {preset.description}")
        for row in (r for r in rows if r["preset"] == name):
            print(f"  {row['detector']}.{row['parameter']} = {_shown(row['value'])}   ({row['source']})")
        for (where, detector), why in NOT_SET.items():
            if where == name and args.name in (None, detector):
                print(f"  {detector}: not set, keeps its defaults ({why})")
        for (where, detector), what in GAPS.items():
            if where == name and args.name in (None, detector):
                print(f"  {detector}: not reproduced: {what}")
    print("\nA detector a preset does not list keeps its defaults; explicit parameters (--param, --params) "
          "override the preset.")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    from oodscope.detectors import registered

    detectors = registered()
    if args.name is not None:
        if args.name not in detectors:
            raise UsageError(f"unknown detector {args.name!r}; registered: {', '.join(detectors)}")
    if args.presets:
        return _print_presets(args)
    if args.name is not None:
        cls = detectors[args.name]
        info = describe(cls)
        if args.json:
            print(json.dumps(info | {"doc": _module_doc(cls), "class_doc": _class_doc(cls)}, indent=2))
            return EXIT_OK
        _print_one(info, sys.stdout)
        print()
        print(_module_doc(cls))
        class_doc = _class_doc(cls)
        if class_doc and class_doc not in _module_doc(cls):
            print()
            print(class_doc)
        return EXIT_OK
    infos = [describe(cls) for cls in detectors.values()]
    if args.json:
        print(json.dumps(infos, indent=2))
        return EXIT_OK
    for k, info in enumerate(infos):
        if k:
            print()
        _print_one(info, sys.stdout)
    print(f"\n{len(infos)} detectors; `oodscope detectors NAME` shows one in full, --param KEY=VALUE sets a parameter")
    from oodscope.detectors.presets import PRESET_NAMES

    print(f"presets (--preset of fit and bench): {', '.join(PRESET_NAMES)}; `oodscope detectors --presets` shows "
          "their values and sources")
    return EXIT_OK


def _print_one(info: dict[str, Any], out) -> None:
    print(f"{info['name']}  [{info['kind_label']}]  {info['summary']}", file=out)
    reads = ", ".join(info["reads"]) or "the features of its members"
    print(f"  needs     {info['needs']}; reads {reads}", file=out)
    if info["cites"]:
        print(f"  cites     {info['cites']}", file=out)
    params = [f"{name} (required)" for name in info["required"]]
    params += [f"{name}={_shown(value)}" for name, value in info["defaults"].items()]
    print(f"  params    {', '.join(params) or 'none'}", file=out)
    for preset, values in info.get("presets", {}).items():
        shown = ", ".join(f"{k}={_shown(v)}" for k, v in values.items())
        print(f"  preset    {preset}: {shown}", file=out)


def _module_doc(cls: type) -> str:
    return inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "")


def _class_doc(cls: type) -> str:
    """The class's own docstring (not one inherited from a base class)."""
    own = cls.__dict__.get("__doc__")
    return inspect.cleandoc(own) if own else ""


def _citation(doc: str) -> str:
    """The paragraph of a docstring that cites the paper (joined into one line), or ''."""
    for paragraph in re.split(r"\n\s*\n", doc):
        if _CITATION.search(paragraph):
            text = " ".join(line.strip() for line in paragraph.splitlines())
            return text if len(text) <= 300 else text[:297] + "..."
    return ""


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _shown(value: Any) -> str:
    """A default as ``--param`` takes it (JSON: ``null``, ``true``, ``"auto"``)."""
    return json.dumps(value)
