"""The phrasings of the ID prompts that the prompt audit compares: template paraphrases, context words,
class-name synonyms (user-given, then WordNet) and the template ensemble."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASELINE_TEMPLATE = "a photo of a {}."  # MCM's single prompt (the detectors' "simple" templates)

#: Paraphrases of the baseline with the same information (written for this audit).
PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "a picture of a {}.",
    "an image of a {}.",
    "a photograph of a {}.",
    "a snapshot of a {}.",
    "this is a {}.",
    "this is a photo of a {}.",
    "there is a {} in the picture.",
    "a photo of the {}.",
    "a photo of one {}.",
    "a {} in a photo.",
)

#: Context words removed from or added to the baseline.
CONTEXT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a blurry photo of a {}.",
    "a low-resolution photo of a {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a bright, high-quality photo of a {}.",
    "a drawing of a {}.",
)

#: Context templates that name the domain (used when ``domain`` is given; ``{domain}`` is replaced).
DOMAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}, a type of {domain}.",
    "a product photo of a {}, a type of {domain}.",
    "a {} ({domain}).",
    "a photo of a {domain} item: a {}.",
)

# WordNet lexicographer categories of photographable things; the most frequent sense of a class name in
# one of them gives its synonyms (so "sneaker" means the shoe, not someone who sneaks). People are left
# out because many object names also have a person sense; a name with only person senses falls back to
# its most frequent sense.
CONCRETE_CATEGORIES: tuple[str, ...] = (
    "noun.artifact", "noun.animal", "noun.plant", "noun.food", "noun.object", "noun.body",
    "noun.substance", "noun.location", "noun.phenomenon",
)


@dataclass(frozen=True)
class PromptVariant:
    """One way of phrasing the ID prompts.

    ``templates``: the templates applied to each class name (several = a prompt ensemble);
    ``names``: class -> the name(s) used in place of the class name (absent = the class name itself;
    several names = an ensemble over them).
    """

    id: str
    kind: str  # "baseline" | "template" | "context" | "class_name" | "ensemble" | "custom"
    label: str
    templates: tuple[str, ...]
    names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def prompts(self, classes: Sequence[str]) -> dict[str, list[str]]:
        """Class -> prompt texts (passed to a zero-shot detector as ``custom_prompts``)."""
        out = {}
        for c in classes:
            out[c] = [t.format(n) for n in self.names.get(c, (c,)) for t in self.templates]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "label": self.label, "templates": list(self.templates),
                "names": {k: list(v) for k, v in self.names.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptVariant:
        return cls(d["id"], d["kind"], d["label"], tuple(d["templates"]),
                   {k: tuple(v) for k, v in d.get("names", {}).items()})


def _wordnet_index(directory: Path) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    with open(directory / "index.noun", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            fields = line.split()
            # lemma pos synset_cnt p_cnt [ptr_symbol]*p_cnt sense_cnt tagsense_cnt synset_offset*synset_cnt
            count = int(fields[2])
            index[fields[0]] = [int(x) for x in fields[-count:]]
    return index


_WORDNET_CACHE: dict[str, dict[str, list[int]]] = {}


def wordnet_synonyms(
    name: str,
    *,
    directory: str | os.PathLike | None = None,
    categories: Sequence[str] = CONCRETE_CATEGORIES,
) -> list[str]:
    """Other names of ``name``: the lemmas of its most frequent WordNet noun sense in ``categories``.

    A name with ``/`` ("T-shirt/top") is split and each part is an alternative too. WordNet is read
    from ``directory`` (default ``/usr/share/wordnet``, the Debian ``wordnet-base`` package); without
    it, the lemmas of the ImageNet-1k synset that contains the name (shipped with oodscope) are used.
    """
    from oodscope.text.lexicon import LEXNAMES, SYSTEM_WORDNET

    parts = [p.strip() for p in name.split("/") if p.strip()]
    out: list[str] = [p for p in parts if p != name] if len(parts) > 1 else []
    folder = Path(directory) if directory is not None else SYSTEM_WORDNET
    have_wordnet = (folder / "index.noun").is_file() and (folder / "data.noun").is_file()
    for part in parts:
        lemmas: list[str] = []
        if have_wordnet:
            key = str(folder)
            if key not in _WORDNET_CACHE:
                _WORDNET_CACHE[key] = _wordnet_index(folder)
            offsets = _WORDNET_CACHE[key].get(part.lower().replace(" ", "_"), [])
            senses = []
            with open(folder / "data.noun", "rb") as fh:
                for offset in offsets:
                    fh.seek(offset)
                    fields = fh.readline().decode("utf-8", errors="replace").split()
                    count = int(fields[3], 16)
                    senses.append((LEXNAMES.get(int(fields[1]), ""),
                                   [fields[4 + 2 * i].replace("_", " ") for i in range(count)]))
            chosen = next((s for s in senses if s[0] in categories), senses[0] if senses else None)
            lemmas = chosen[1] if chosen else []
        else:
            from oodscope.backbones.imagenet import imagenet_lemmas

            lemmas = next((g for g in imagenet_lemmas() if part.lower() in (x.lower() for x in g)), [])
        for lemma in lemmas:
            if lemma.lower() != part.lower() and lemma.lower() != name.lower():
                out.append(lemma)
    seen: set[str] = set()
    return [x for x in out if not (x.lower() in seen or seen.add(x.lower()))]


def prompt_variants(
    classes: Sequence[str],
    *,
    domain: str | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    wordnet: bool = True,
    max_name_variants: int = 3,
    paraphrases: Sequence[str] = PARAPHRASE_TEMPLATES,
    contexts: Sequence[str] = CONTEXT_TEMPLATES,
    ensemble: bool = True,
) -> list[PromptVariant]:
    """The default set of phrasings of the ID prompts, baseline first.

    - ``baseline``: "a photo of a {}." with the class names as given;
    - ``template``: paraphrases with the same content (``paraphrases``);
    - ``context``: context words removed ("{}") or added ("a blurry photo of a {}.") (``contexts``),
      plus domain phrases ("a product photo of a {}, a type of clothing.") when ``domain`` is given;
    - ``class_name``: the baseline template with synonyms of the class names — variant ``k`` uses
      the ``k``-th alternative of every class that has one (``synonyms`` from the user first, then
      :func:`wordnet_synonyms`), and one variant ensembles the prompts of all names of each class;
    - ``ensemble``: the 16 templates of :data:`oodscope.text.prompts.DEFAULT_TEMPLATES` ensembled.

    Variants whose prompts are identical to an earlier one are dropped.
    """
    from oodscope.text.prompts import DEFAULT_TEMPLATES, resolve_templates

    classes = list(classes)
    unknown = sorted(set(synonyms or {}) - set(classes))
    if unknown:
        raise ValueError(f"synonyms given for unknown classes: {unknown}")
    variants = [PromptVariant("baseline", "baseline", BASELINE_TEMPLATE, (BASELINE_TEMPLATE,))]
    for k, t in enumerate(resolve_templates(list(paraphrases)) if paraphrases else (), 1):
        variants.append(PromptVariant(f"template-{k:02d}", "template", t, (t,)))
    context = list(contexts) + [t.replace("{domain}", domain) for t in DOMAIN_TEMPLATES] if domain else list(contexts)
    for k, t in enumerate(resolve_templates(context) if context else (), 1):
        variants.append(PromptVariant(f"context-{k:02d}", "context", t, (t,)))
    alternatives: dict[str, list[str]] = {}
    for c in classes:
        alts = [s for s in (synonyms or {}).get(c, []) if s.strip() and s != c]
        if wordnet:
            alts += wordnet_synonyms(c)
        seen = {c.lower()}
        alternatives[c] = [a for a in alts if not (a.lower() in seen or seen.add(a.lower()))]
    deepest = max((len(a) for a in alternatives.values()), default=0)
    for k in range(1, min(max_name_variants, deepest) + 1):
        names = {c: (a[k - 1],) for c, a in alternatives.items() if len(a) >= k}
        shown = ", ".join(f"{c}->{n[0]}" for c, n in names.items())
        variants.append(PromptVariant(f"name-{k}", "class_name", f"synonym {k}: {shown}", (BASELINE_TEMPLATE,), names))
    if deepest:
        names = {c: (c, *a) for c, a in alternatives.items() if a}
        variants.append(PromptVariant("name-all", "class_name", "all names of each class, ensembled",
                                      (BASELINE_TEMPLATE,), names))
    if ensemble:
        variants.append(PromptVariant("ensemble", "ensemble", f"{len(DEFAULT_TEMPLATES)}-template ensemble",
                                      tuple(DEFAULT_TEMPLATES)))
    unique, seen_prompts = [], set()
    for v in variants:
        key = json.dumps(v.prompts(classes), sort_keys=True)
        if key not in seen_prompts:
            seen_prompts.add(key)
            unique.append(v)
    return unique
