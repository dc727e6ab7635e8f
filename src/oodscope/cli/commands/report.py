"""``oodscope report RESULTS_DIR -o report.html``: one self-contained HTML file (no network needed).

RESULTS_DIR is what ``oodscope bench`` wrote (results.json + scores/) or an ``oodscope audit``
directory (audit.json, CSV, PNG). ``--audit DIR`` adds audit results (repeatable); audit
directories inside RESULTS_DIR are added automatically. An explicit ``-o`` that exists is refused
unless ``--overwrite`` (the default, RESULTS_DIR/report.html, is part of the results and rewritten).
Exit codes: 0 = written; 2 = RESULTS_DIR (or an ``--audit`` directory) is not results, or ``-o``
exists; 1 = the work failed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from oodscope.cli.commands._common import EXIT_OK, UsageError, add_overwrite_option, check_output, checking

HELP = "self-contained HTML report of bench / audit results"


def register(sub) -> None:
    parser = sub.add_parser("report", help=HELP,
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="directory written by `oodscope bench` or `oodscope audit`")
    parser.add_argument("-o", "--output", type=Path, help="HTML file to write (default RESULTS/report.html)")
    add_overwrite_option(parser, "the file is replaced")
    parser.add_argument("--audit", action="append", type=Path, default=[], metavar="DIR",
                        help="an audit results directory to include (repeatable)")
    parser.add_argument("--title", help="report title")
    parser.add_argument("--max-histograms", type=int, default=None,
                        help="score histograms per backbone (best detectors first; default all)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oodscope.reports import render_report

    with checking():
        for folder, option in [(args.results, "RESULTS_DIR")] + [(a, "--audit") for a in args.audit]:
            if not folder.is_dir():
                raise UsageError(f"{option} {folder}: no such directory")
        if args.output is not None:
            check_output(args.output, overwrite=args.overwrite, kind="file")
    try:
        path = render_report(args.results, args.output, audit_dirs=args.audit, title=args.title,
                             max_histograms=args.max_histograms)
    except FileNotFoundError as err:  # the directory holds no bench or audit results
        raise UsageError(str(err)) from None
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return EXIT_OK
