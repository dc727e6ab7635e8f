"""The WordNet noun hierarchy, offline: synonyms, sub-categories (hyponyms) and proper nouns of names.

Used by NegRefine's WordNet filter (:mod:`oodscope.detectors.negrefine`), which removes negative
labels that are synonyms or sub-categories of an ID class, or proper nouns (the paper asks an LLM).

Source: WordNet 3.0 (Princeton University), ``data.noun``: every noun synset with its lemmas (case
kept, ``_`` -> space) and its hypernym pointers (``@`` class hypernyms and ``@i`` instance
hypernyms). The packaged ``wordnet_nouns.txt`` (WordNet 3.0 licence in
``oodscope/data/wordnet_LICENSE.txt``) is made by ``scripts/build_wordnet_hierarchy.py`` from Debian's
``wordnet-base`` (``/usr/share/wordnet``), which can also be read directly and gives the same data (a
test checks this): 82,115 synsets, one line each, in ``data.noun`` order.

- A *synonym* of a name: any lemma of a synset that has the name as a lemma (case-insensitive).
- A *sub-category*: any lemma of a synset below such a synset (transitive hyponyms, instances included).
- A *proper noun*: a lemma that WordNet writes only with an upper-case letter somewhere (``Paris``,
  ``Einstein``, eponyms such as ``Charcot-Marie-Tooth disease``, acronyms such as ``phase IV clinical
  trial``); one that also has an all-lower-case sense (``china`` the porcelain) is not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib.resources import files
from pathlib import Path

from oodscope.text.lexicon import SYSTEM_WORDNET

PACKAGED_FILE = "wordnet_nouns.txt"
_HYPERNYM_POINTERS = ("@", "@i")


@dataclass(frozen=True, eq=False)
class NounHierarchy:
    """Noun synsets: ``lemmas[i]`` (case kept) and ``parents[i]`` (indices of its hypernyms)."""

    lemmas: tuple[tuple[str, ...], ...]
    parents: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.lemmas)

    @cached_property
    def by_lemma(self) -> dict[str, tuple[int, ...]]:
        """Lower-cased lemma -> the synsets that have it."""
        out: dict[str, list[int]] = {}
        for i, words in enumerate(self.lemmas):
            for w in dict.fromkeys(normalize(x) for x in words):
                out.setdefault(w, []).append(i)
        return {k: tuple(v) for k, v in out.items()}

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Indices of the direct hyponyms of each synset."""
        kids: list[list[int]] = [[] for _ in self.lemmas]
        for i, ups in enumerate(self.parents):
            for u in ups:
                kids[u].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def proper_nouns(self) -> frozenset[str]:
        """Lower-cased lemmas WordNet writes only with a capital letter."""
        capital, lower = set(), set()
        for words in self.lemmas:
            for w in words:
                (capital if any(c.isupper() for c in w) else lower).add(normalize(w))
        return frozenset(capital - lower)

    def synsets_of(self, name: str) -> tuple[int, ...]:
        """Synsets with ``name`` as a lemma (case-insensitive, ``_`` = space, spaces collapsed)."""
        return self.by_lemma.get(normalize(name), ())

    def related(self, names: Iterable[str]) -> set[str]:
        """Lower-cased lemmas of the synsets of ``names`` and of every synset below them: their
        synonyms and sub-categories (hyponyms, transitively; instances included)."""
        children = self.children
        todo = [s for name in names for s in self.synsets_of(name)]
        seen = set(todo)
        while todo:
            for child in children[todo.pop()]:
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        return {normalize(lemma) for s in seen for lemma in self.lemmas[s]}


def normalize(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def class_name_variants(name: str) -> list[str]:
    """The WordNet names an ID class name may stand for: itself, its ``/``-separated parts
    (``"T-shirt/top"``) and the name without a parenthesised note (``"kite (bird of prey)"``)."""
    base = name.split("(")[0] if "(" in name else name
    parts = [name, base, *name.split("/"), *base.split("/")]
    return list(dict.fromkeys(p for p in (normalize(x) for x in parts) if p))


# --------------------------------------------------------------------------- reading WordNet
def read_noun_hierarchy(directory: str | os.PathLike = SYSTEM_WORDNET) -> NounHierarchy:
    """Parse ``data.noun``: lemmas and hypernym pointers of every synset."""
    path = Path(directory) / "data.noun"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (install the 'wordnet-base' package or use the packaged file)")
    offsets: list[str] = []
    lemmas: list[tuple[str, ...]] = []
    pointers: list[list[str]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ")[0].split()
            # synset_offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [ptr offset pos st]...
            count = int(fields[3], 16)
            words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(count))
            at = 4 + 2 * count
            n_ptr = int(fields[at])
            ptrs = [fields[at + 1 + 4 * j : at + 5 + 4 * j] for j in range(n_ptr)]
            offsets.append(fields[0])
            lemmas.append(words)
            pointers.append([p[1] for p in ptrs if p[0] in _HYPERNYM_POINTERS and p[2] == "n"])
    row = {offset: i for i, offset in enumerate(offsets)}
    parents = tuple(tuple(sorted(row[o] for o in ps)) for ps in pointers)
    return NounHierarchy(tuple(lemmas), parents)


def format_noun_hierarchy(hierarchy: NounHierarchy) -> str:
    """The text of the packaged file: one synset per line, ``lemma|lemma<TAB>parent parent``."""
    lines = [
        "# WordNet 3.0 noun synsets, derived for oodscope (see wordnet_LICENSE.txt for the WordNet licence).",
        "# Built from data.noun by scripts/build_wordnet_hierarchy.py: one synset per line, in data.noun order:",
        "# its lemmas (case kept, '_' -> ' ') separated by '|', a tab, and the line numbers (0-based, among",
        "# the synset lines) of its hypernyms ('@' and '@i' pointers).",
        f"# Synsets: {len(hierarchy)}.",
    ]
    for words, parents in zip(hierarchy.lemmas, hierarchy.parents, strict=True):
        lines.append("|".join(words) + "\t" + " ".join(map(str, parents)))
    return "\n".join(lines) + "\n"


def parse_noun_hierarchy(text: str) -> NounHierarchy:
    """Inverse of :func:`format_noun_hierarchy`."""
    lemmas, parents = [], []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        words, _, ups = line.partition("\t")
        lemmas.append(tuple(words.split("|")))
        parents.append(tuple(int(u) for u in ups.split()))
    return NounHierarchy(tuple(lemmas), tuple(parents))


@lru_cache(maxsize=4)
def load_noun_hierarchy(source: str = "auto") -> NounHierarchy:
    """``source``: ``"packaged"``, ``"system"`` (``/usr/share/wordnet``), ``"auto"`` (packaged, else
    system) or a WordNet directory."""
    if source in ("auto", "packaged"):
        try:
            return parse_noun_hierarchy((files("oodscope") / "data" / PACKAGED_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            if source == "packaged":
                raise
        return read_noun_hierarchy(SYSTEM_WORDNET)
    return read_noun_hierarchy(SYSTEM_WORDNET if source == "system" else source)


def related_to_classes(classes: Sequence[str], source: str = "auto") -> set[str]:
    """Synonyms and sub-categories (lower-cased) of ID class names, through :func:`class_name_variants`."""
    hierarchy = load_noun_hierarchy(source)
    return hierarchy.related(v for c in classes for v in class_name_variants(c))
