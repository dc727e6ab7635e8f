"""Build src/oodscope/data/imagenet_glosses.json: the WordNet gloss and hypernym path of each ImageNet class.

    python scripts/build_imagenet_glosses.py [--wordnet /usr/share/wordnet] [--check]

Input: WordNet 3.0 ``data.noun`` of the Debian package ``wordnet-base`` (licence:
``src/oodscope/data/wordnet_LICENSE.txt``) and the 1,000 class ids of the shipped
``imagenet_classes.json`` (whose wnids are ``n`` + the data.noun offset). Output, for each class in
model-output order: ``gloss`` — the definition part of the synset's gloss (the text after ``|`` up to
the first quoted example, i.e. before ``; "``); ``hypernyms`` — the first lemma of each synset on the
hypernym path, nearest first, up to the root ``entity``, following the first hypernym pointer
(``@``, or ``@i`` for instances) of each synset. ConSE's ``label_text`` options build the class
texts from these (:mod:`oodscope.backbones.conse`). ``--check`` rebuilds in memory and exits 1 if
the shipped file differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "oodscope" / "data"
OUT = DATA / "imagenet_glosses.json"


def read_noun_synsets(data_noun: Path) -> dict[str, tuple[str, list[str], str | None]]:
    """offset -> (first lemma, [first hypernym offset] or [], gloss) for every noun synset."""
    out: dict[str, tuple[str, list[str], str | None]] = {}
    with open(data_noun, encoding="latin-1") as fh:
        for line in fh:
            if line.startswith(" "):
                continue  # licence header
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset, n_words = fields[0], int(fields[3], 16)
            first = fields[4].replace("_", " ")
            pos = 4 + 2 * n_words
            n_ptr = int(fields[pos])
            hypernym = None
            for k in range(n_ptr):
                symbol, target, target_pos = fields[pos + 1 + 4 * k : pos + 4 + 4 * k]
                if symbol in ("@", "@i") and target_pos == "n":
                    hypernym = target
                    break
            out[offset] = (first, [hypernym] if hypernym else [], gloss.strip())
    return out


def definition(gloss: str) -> str:
    """The definition of a gloss, without its quoted usage examples."""
    return gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()


def build(wordnet: Path) -> str:
    synsets = read_noun_synsets(wordnet / "data.noun")
    classes = json.loads((DATA / "imagenet_classes.json").read_text())["classes"]
    rows = []
    for c in classes:
        offset = c["wnid"][1:]
        _, parent, gloss = synsets[offset]
        path: list[str] = []
        seen = {offset}
        while parent and parent[0] not in seen:  # the seen set only guards against a malformed cycle
            seen.add(parent[0])
            lemma, parent, _ = synsets[parent[0]]
            path.append(lemma)
        rows.append({"wnid": c["wnid"], "gloss": definition(gloss), "hypernyms": path})
    return json.dumps({
        "source": "WordNet 3.0 (Princeton University, WordNet licence: wordnet_LICENSE.txt), Debian wordnet-base "
                  "data.noun; built by scripts/build_imagenet_glosses.py",
        "classes": rows,
    }, indent=0, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", default="/usr/share/wordnet", help="WordNet dict directory (data.noun)")
    parser.add_argument("--check", action="store_true", help="compare with the shipped file instead of writing")
    args = parser.parse_args(argv)
    text = build(Path(args.wordnet))
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'up to date' if same else 'DIFFERS'}")
        return 0 if same else 1
    tmp = OUT.with_name(OUT.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
