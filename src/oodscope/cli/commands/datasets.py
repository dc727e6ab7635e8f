"""``oodscope datasets``: the data set registry from the command line.

``list`` the registered data sets and benchmark protocols, show one entry's ``info`` (source,
licence, expected count, checksums, where it goes), ``check`` a copy placed by hand (files,
checksums, image count) and ``download`` an entry that has plain-HTTP URLs (resumable, checksum
verified; offline, it says how to place the file by hand). Exit codes: 0 done / OK, 1 the check
found problems, 2 unknown name or the download failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_PROBLEMS = 1
EXIT_ERROR = 2


def register(sub) -> None:
    parser = sub.add_parser("datasets", help="list, describe, check and download evaluation data sets")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser("list", help="registered data sets and benchmark protocols (the default)")
    listing.add_argument("--tag", default=None, help="only entries with this tag (e.g. openood-v1.5, anomaly)")
    info = actions.add_parser("info", help="everything known about one entry")
    info.add_argument("name")
    info.add_argument("--json", action="store_true", help="print JSON")
    check = actions.add_parser("check", help="verify a copy: files, checksums, image count")
    check.add_argument("name")
    check.add_argument("--root", type=Path, default=None, help="where the copy is (default: the data root)")
    check.add_argument("--no-checksums", action="store_true", help="skip hashing (counts and files only)")
    download = actions.add_parser("download", help="download (and unpack) an entry that has URLs, then check it")
    download.add_argument("name")
    download.add_argument("--root", type=Path, default=None, help="where to put it (default: the data root)")
    download.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation")
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, action=None)


def print_listing(tag: str | None = None) -> None:
    from oodscope.io.registry import data_root, list_benchmarks, list_datasets

    print("benchmarks (oodscope bench --benchmark NAME):")
    for b in list_benchmarks():
        print(f"  {b.name:<30} {b.description}")
    print(f"\ndata sets (root {data_root()}; offline = loads from installed packages):")
    for spec in list_datasets(tag):
        where = "offline" if spec.offline else ("download" if spec.urls else "by hand")
        n = "" if spec.expected_files is None else f"{spec.expected_files:,}"
        print(f"  {spec.name:<40} {where:<8} {n:>7}  {spec.description[:70]}")


def _info(name: str, as_json: bool) -> None:
    from oodscope.io.registry import get_spec

    spec = get_spec(name)
    data = spec.info() | {"root": None if spec.root() is None else str(spec.root())}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    count = "not documented" if spec.expected_files is None else f"{spec.expected_files:,} ({spec.count_source})"
    lines = [spec.name, f"  {spec.description}", f"  source:   {spec.source}", f"  licence:  {spec.licence}",
             f"  images:   {count}",
             f"  location: {'installed packages (offline)' if spec.offline else data['root']}"]
    if spec.urls:
        lines += [f"  download: {rel} <- {url}" for rel, url in spec.urls.items()]
    if spec.checksums:
        lines += [f"  checksum: {c.path} {c.algorithm} {c.digest} ({c.source or spec.checksum_source})"
                  for c in spec.checksums]
    else:
        lines.append(f"  checksum: none ({spec.checksum_source})")
    if spec.how_to_place:
        lines.append(f"  by hand:  {spec.how_to_place}")
    print("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    from oodscope.io.registry import DownloadError, check_dataset, download_dataset

    try:
        if args.action in (None, "list"):
            print_listing(getattr(args, "tag", None))
            return 0
        if args.action == "info":
            _info(args.name, args.json)
            return 0
        if args.action == "check":
            report = check_dataset(args.name, args.root, verify_checksums=not args.no_checksums)
        else:
            report = download_dataset(args.name, args.root, progress=not args.quiet, timeout=args.timeout)
    except KeyError as err:
        print(f"oodscope datasets: {err.args[0] if err.args else err}", file=sys.stderr)
        return EXIT_ERROR
    except DownloadError as err:
        print(f"oodscope datasets: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(report)
    for row in report.checksums:
        print(f"  {row['path']}: {row['algorithm']} {row['status']}")
    return 0 if report.ok else EXIT_PROBLEMS
