"""Word lists for negative-label methods (NegLabel, AdaNeg): WordNet nouns and adjectives, offline.

Source: WordNet 3.0 (Princeton University), ``data.noun`` and ``data.adj``. Lemmas are lower-cased,
with ``_`` turned into a space and the adjective position markers ``(a)``, ``(p)``, ``(ip)`` removed,
and filed under their lexicographer category (``noun.artifact``, ``adj.all``, ...). Two lists ship
with oodscope (WordNet 3.0 licence in ``oodscope/data/wordnet_LICENSE.txt``), both made by
``scripts/build_wordnet_lists.py`` from Debian's ``wordnet-base`` (``/usr/share/wordnet``), which
can also be read directly and gives the same lists (a test checks this):

- ``wordnet_words.txt`` (``lemmas="all"``): every lemma of every synset. 117,798 distinct nouns,
  21,479 distinct adjectives, 136,139 distinct words overall (a word that is both a noun and an
  adjective is kept once, as a noun). oodscope's own corpus (NegLabel ``recipe="oodscope-v1"``).
- ``wordnet_heads.txt`` (``lemmas="heads"``): one word per synset, its first lemma (the synset's
  head word). 67,186 distinct nouns and 14,006 distinct adjectives in all categories. The corpus of
  the official recipe (:data:`OFFICIAL_CORPUS`) leaves out ``noun.animal`` and ``noun.food``, as
  NegLabel's released word files do (XueJiang16/NegLabel ``txtfiles/``: one file per lexicographer
  category, none for those two): **58,514 nouns and 14,006 adjectives**, of which 12,280 are not
  also nouns. The released files hold 58,546 nouns and 13,091 adjectives (11,454 not also nouns):
  they were cut from another WordNet release (they contain e.g. "obama", "anime" and quote-escaped
  lemmas such as ``1530"s``, absent from WordNet 3.0), which the Debian package cannot reproduce.
  Against them, our nouns differ by 124 + 156 words (58,390 in common, -32 in all) and our
  adjectives have 996 words theirs lack and lack 81 of theirs (13,010 in common, +915 in all):
  their adjective files drop about one in six adjective-cluster head words (mostly one head of an
  antonym pair) by a rule that could not be recovered from WordNet 3.0's data files, so all head
  words are kept here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Literal

SYSTEM_WORDNET = Path("/usr/share/wordnet")
PACKAGED_FILE = "wordnet_words.txt"
HEADS_FILE = "wordnet_heads.txt"
PACKAGED_FILES = {"all": PACKAGED_FILE, "heads": HEADS_FILE}
Lemmas = Literal["all", "heads"]

# Lexicographer file numbers -> names for the parts of speech used here (WordNet's "lexnames").
LEXNAMES: dict[int, str] = {
    0: "adj.all", 1: "adj.pert", 3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact",
    7: "noun.attribute", 8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event",
    12: "noun.feeling", 13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive",
    17: "noun.object", 18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession",
    22: "noun.process", 23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state",
    27: "noun.substance", 28: "noun.time", 44: "adj.ppl",
}
NOUN_CATEGORIES = tuple(name for _, name in sorted(LEXNAMES.items()) if name.startswith("noun."))
ADJECTIVE_CATEGORIES = tuple(name for _, name in sorted(LEXNAMES.items()) if name.startswith("adj."))
#: The official NegLabel/AdaNeg corpus: head words, without the categories NegLabel ships no file for.
OFFICIAL_CORPUS: dict[str, object] = {"lemmas": "heads", "exclude_categories": ("noun.animal", "noun.food")}

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_ALPHABETIC = re.compile(r"^[a-z][a-z '\-]*$")

Pos = Literal["noun", "adj"]


@dataclass(frozen=True)
class Lexicon:
    """Candidate words with their part of speech (``"noun"`` or ``"adj"``), in a fixed order."""

    words: tuple[str, ...]
    pos: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.words) != len(self.pos):
            raise ValueError("Lexicon.words and Lexicon.pos must have the same length")
        bad = sorted(set(self.pos) - {"noun", "adj"})
        if bad:
            raise ValueError(f"Lexicon.pos must be 'noun' or 'adj', got {bad}")

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def from_words(cls, words: Iterable[str], pos: Pos = "noun") -> Lexicon:
        """A lexicon of user words, all of one part of speech, de-duplicated in order."""
        unique = list(dict.fromkeys(w.strip() for w in words if w.strip()))
        return cls(tuple(unique), (pos,) * len(unique))


# --------------------------------------------------------------------------- reading WordNet
def read_wordnet_data(directory: str | os.PathLike = SYSTEM_WORDNET, lemmas: Lemmas = "all") -> dict[str, list[str]]:
    """Category -> sorted distinct lemmas, parsed from WordNet's ``data.noun`` and ``data.adj``:
    every lemma of each synset (``lemmas="all"``) or its first one only (``"heads"``)."""
    _check_lemmas(lemmas)
    directory = Path(directory)
    categories: dict[str, set[str]] = {}
    for pos in ("noun", "adj"):
        path = directory / f"data.{pos}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (install the 'wordnet-base' package or use the packaged list)")
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  "):  # licence header
                    continue
                fields = line.split()
                # synset_offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] ...
                category = LEXNAMES.get(int(fields[1]))
                if category is None:
                    continue
                for i in range(1 if lemmas == "heads" else int(fields[3], 16)):
                    lemma = _ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ").lower()
                    categories.setdefault(category, set()).add(lemma)
    return {name: sorted(categories[name]) for name in sorted(categories, key=_category_rank)}


def format_word_list(categories: dict[str, list[str]], lemmas: Lemmas = "all") -> str:
    """The text of a packaged word list for a category -> lemmas map."""
    _check_lemmas(lemmas)
    nouns = {w for c, ws in categories.items() if c.startswith("noun.") for w in ws}
    adjs = {w for c, ws in categories.items() if c.startswith("adj.") for w in ws}
    which = "every synset lemma" if lemmas == "all" else "the first lemma of every synset (its head word)"
    lines = [
        "# WordNet 3.0 nouns and adjectives, derived for oodscope (see wordnet_LICENSE.txt for the WordNet licence).",
        f"# Built from data.noun and data.adj by scripts/build_wordnet_lists.py: {which},",
        "# lower-cased, '_' -> ' ', adjective markers removed.",
        "# Format: a line '@<lexicographer category>' starts a category; the lemmas of that category follow.",
        f"# Distinct lemmas: {len(nouns)} nouns, {len(adjs)} adjectives, {len(nouns | adjs)} words overall.",
    ]
    for name in sorted(categories, key=_category_rank):
        lines.append(f"@{name}")
        lines.extend(categories[name])
    return "\n".join(lines) + "\n"


def write_word_list(path: str | os.PathLike, directory: str | os.PathLike = SYSTEM_WORDNET,
                    lemmas: Lemmas = "all") -> Path:
    """Regenerate a packaged list from a WordNet installation (how ``wordnet_words.txt`` and
    ``wordnet_heads.txt`` are made, by ``scripts/build_wordnet_lists.py``)."""
    path = Path(path)
    text = format_word_list(read_wordnet_data(directory, lemmas), lemmas)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_word_list(text: str) -> dict[str, list[str]]:
    """Inverse of :func:`format_word_list`."""
    categories: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            current = categories.setdefault(line[1:].strip(), [])
        elif current is None:
            raise ValueError("word list: a lemma appears before the first '@category' line")
        else:
            current.append(line)
    return categories


def load_wordnet(source: str | os.PathLike = "auto", lemmas: Lemmas = "all") -> dict[str, list[str]]:
    """Category -> lemmas. ``source``: ``"packaged"`` (shipped list), ``"system"``
    (``/usr/share/wordnet``), ``"auto"`` (packaged list, else system), or a WordNet directory;
    ``lemmas``: every lemma of each synset (``"all"``) or its head word (``"heads"``)."""
    _check_lemmas(lemmas)
    if source in ("auto", "packaged"):
        try:
            text = (files("oodscope") / "data" / PACKAGED_FILES[lemmas]).read_text(encoding="utf-8")
            return parse_word_list(text)
        except FileNotFoundError:
            if source == "packaged":
                raise
        return read_wordnet_data(SYSTEM_WORDNET, lemmas)
    if source == "system":
        return read_wordnet_data(SYSTEM_WORDNET, lemmas)
    return read_wordnet_data(source, lemmas)


# --------------------------------------------------------------------------- the candidate lexicon
def wordnet_lexicon(
    pos: Sequence[str] = ("noun", "adj"),
    *,
    min_length: int = 1,
    single_word: bool = False,
    alphabetic: bool = False,
    categories: Sequence[str] | None = None,
    exclude_categories: Sequence[str] = (),
    exclude: Iterable[str] = (),
    overlap: Literal["exact", "word"] = "exact",
    source: str | os.PathLike = "auto",
    lemmas: Lemmas = "all",
) -> Lexicon:
    """WordNet lemmas as a de-duplicated candidate list (nouns first, then adjectives, each sorted).

    ``min_length``: drop words shorter than this many characters. ``single_word``: drop multi-word
    lemmas. ``alphabetic``: keep only letters, spaces, hyphens and apostrophes (drops ``.38 caliber``).
    ``categories`` / ``exclude_categories``: keep / drop lexicographer categories (e.g. NegLabel's
    released corpus has no ``noun.animal`` and ``noun.food``). ``exclude``: words to leave out, usually
    the in-distribution class names; ``overlap="exact"`` drops a word equal to one of them
    (case-insensitive), ``"word"`` also drops words sharing any single word with one of them.
    ``lemmas``: every lemma of each synset (``"all"``) or only its head word (``"heads"``, the
    official NegLabel/AdaNeg corpus with ``exclude_categories=("noun.animal", "noun.food")``).
    """
    wanted_pos = set(pos)
    if not wanted_pos <= {"noun", "adj"}:
        raise ValueError(f"pos must be a subset of ('noun', 'adj'), got {list(pos)}")
    if overlap not in ("exact", "word"):
        raise ValueError("overlap must be 'exact' or 'word'")
    data = load_wordnet(source, lemmas)
    unknown = sorted((set(categories or ()) | set(exclude_categories)) - set(data))
    if unknown:
        raise ValueError(f"unknown WordNet categories {unknown}; known: {sorted(data)}")
    excluded_phrases = {e.strip().lower() for e in exclude}
    excluded_tokens = {t for e in excluded_phrases for t in e.split()} if overlap == "word" else set()

    def keep(word: str) -> bool:
        if len(word) < min_length or (single_word and " " in word):
            return False
        if alphabetic and not _ALPHABETIC.match(word):
            return False
        if word in excluded_phrases:
            return False
        return not (excluded_tokens and any(t in excluded_tokens for t in word.split()))

    chosen: dict[str, str] = {}
    for part in ("noun", "adj"):
        if part not in wanted_pos:
            continue
        prefix = "noun." if part == "noun" else "adj."
        names = [c for c in data if c.startswith(prefix) and c not in exclude_categories]
        if categories is not None:
            names = [c for c in names if c in categories]
        for word in sorted({w for c in names for w in data[c]}):
            if word not in chosen and keep(word):
                chosen[word] = part
    return Lexicon(tuple(chosen), tuple(chosen.values()))


def read_word_file(path: str | os.PathLike) -> Lexicon:
    """A user word list: one word per line, optionally ``word<TAB>noun|adj``; ``#`` starts a comment."""
    words, parts = [], []
    seen = set()
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, part = line.partition("\t")
        word, part = word.strip(), (part.strip() or "noun")
        if part not in ("noun", "adj"):
            raise ValueError(f"{path}: part of speech must be 'noun' or 'adj', got {part!r} for {word!r}")
        if word and word not in seen:
            seen.add(word)
            words.append(word)
            parts.append(part)
    return Lexicon(tuple(words), tuple(parts))


def write_word_file(path: str | os.PathLike, lexicon: Lexicon) -> Path:
    """Write ``word<TAB>pos`` lines (read back by :func:`read_word_file`); atomic."""
    for word in lexicon.words:
        if "\n" in word or "\t" in word:
            raise ValueError(f"word {word!r} contains a tab or newline")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{w}\t{p}\n" for w, p in zip(lexicon.words, lexicon.pos, strict=True)), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _check_lemmas(lemmas: str) -> None:
    if lemmas not in PACKAGED_FILES:
        raise ValueError(f"lemmas must be 'all' or 'heads', got {lemmas!r}")


def _category_rank(name: str) -> tuple[int, str]:
    order = {n: i for i, n in enumerate(NOUN_CATEGORIES + ADJECTIVE_CATEGORIES)}
    return (order.get(name, len(order)), name)
