"""Build oodscope's packaged WordNet noun hierarchy from a WordNet 3.0 installation (reproducibly).

    python scripts/build_wordnet_hierarchy.py [--wordnet /usr/share/wordnet] [--check]

Writes ``src/oodscope/data/wordnet_nouns.txt`` (every noun synset: its lemmas and its hypernyms; used by
NegRefine's WordNet filter, :mod:`oodscope.text.wordnet_graph`) from ``data.noun`` of the Debian package
``wordnet-base`` (WordNet 3.0; its licence is ``src/oodscope/data/wordnet_LICENSE.txt``). The output
depends on the WordNet file only. ``--check`` rebuilds in memory and exits 1 if the shipped file differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from oodscope.text.lexicon import SYSTEM_WORDNET
from oodscope.text.wordnet_graph import PACKAGED_FILE, format_noun_hierarchy, read_noun_hierarchy

DATA = Path(__file__).resolve().parents[1] / "src" / "oodscope" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", default=str(SYSTEM_WORDNET), help="WordNet dict directory (data.noun)")
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing")
    args = parser.parse_args(argv)
    hierarchy = read_noun_hierarchy(args.wordnet)
    text = format_noun_hierarchy(hierarchy)
    path = DATA / PACKAGED_FILE
    if args.check:
        same = path.is_file() and path.read_text(encoding="utf-8") == text
        print(f"{path}: {'up to date' if same else 'DIFFERS'}")
        status = 0 if same else 1
    else:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        print(f"wrote {path}")
        status = 0
    print(f"  {len(hierarchy)} noun synsets, {len(hierarchy.proper_nouns)} proper-noun lemmas")
    return status


if __name__ == "__main__":
    sys.exit(main())
