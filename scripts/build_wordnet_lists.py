"""Build oodscope's packaged WordNet word lists from a WordNet 3.0 installation (reproducibly).

    python scripts/build_wordnet_lists.py [--wordnet /usr/share/wordnet] [--check]

Writes ``src/oodscope/data/wordnet_words.txt`` (every lemma of every noun and adjective synset) and
``src/oodscope/data/wordnet_heads.txt`` (the first lemma of every synset, the corpus of the official
NegLabel/AdaNeg recipe) from ``data.noun`` and ``data.adj`` of the Debian package ``wordnet-base``
(WordNet 3.0; its licence is ``src/oodscope/data/wordnet_LICENSE.txt``). The output depends on the
WordNet files only: lemmas are lower-cased, ``_`` becomes a space, adjective markers are removed, and
each lexicographer category is sorted. ``--check`` rebuilds in memory and exits 1 if a shipped file
differs. The counts are printed (and stated in :mod:`oodscope.text.lexicon`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from oodscope.text.lexicon import (
    OFFICIAL_CORPUS,
    PACKAGED_FILES,
    SYSTEM_WORDNET,
    format_word_list,
    read_wordnet_data,
    wordnet_lexicon,
)

DATA = Path(__file__).resolve().parents[1] / "src" / "oodscope" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", default=str(SYSTEM_WORDNET), help="WordNet dict directory (data.noun, data.adj)")
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args(argv)
    status = 0
    for lemmas, name in PACKAGED_FILES.items():
        categories = read_wordnet_data(args.wordnet, lemmas)
        text = format_word_list(categories, lemmas)
        path = DATA / name
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{path}: {'up to date' if same else 'DIFFERS'}")
            status |= 0 if same else 1
        else:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            print(f"wrote {path}")
        nouns = {w for c, ws in categories.items() if c.startswith("noun.") for w in ws}
        adjs = {w for c, ws in categories.items() if c.startswith("adj.") for w in ws}
        print(f"  {lemmas}: {len(nouns)} nouns, {len(adjs)} adjectives, {len(nouns | adjs)} words")
    official = wordnet_lexicon(source=args.wordnet, **OFFICIAL_CORPUS)
    n_noun = official.pos.count("noun")
    n_adj = len(official) - n_noun
    print(f"  official corpus (heads, no noun.animal / noun.food): {n_noun} nouns, {n_adj} adjectives that are "
          f"not nouns; 15 % of each: {int(n_noun * 0.15)} + {int(n_adj * 0.15)} = "
          f"{int(n_noun * 0.15) + int(n_adj * 0.15)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
