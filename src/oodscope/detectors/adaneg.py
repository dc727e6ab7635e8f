"""AdaNeg — adaptive negative proxies from a memory of test images (zero-shot, test-time adaptive).

Zhang & Zhang, "AdaNeg: Adaptive Negative Proxy Guided OOD Detection with Vision-Language Models",
NeurIPS 2024.

On top of NegLabel (mined negatives), a memory bank keeps, for every label (ID class or negative
label), a few test-image embeddings. Images stream in batches; for each batch:
1. NegLabel's grouped ID mass S_v(x) on the text labels (the "vanilla" score);
2. gating: S_v > gamma + g(1 - gamma) -> cached in the slot of its top ID class; S_v < gamma - g*gamma ->
   cached in the slot of its top negative label; a full slot keeps its lowest-entropy images
   (entropy of the softmax over the ID, resp. negative, logits);
3. adaptive proxies: a slot with cached images uses normalize(text + sum of its images) (task-adaptive)
   or, with ``sample_adaptive``, normalize(sum_j w_j m_j), w_j = exp(-beta (1 - cos(x, m_j))) over the
   text and the images of the slot; other labels keep their text embedding;
4. S_a(x): NegLabel's grouped ID mass with the proxies; Score: ``-(S_a + lambda * S_v)``.
The batch's own images enter the memory before the batch is scored, as in the official code.

Official code: YBZh/OpenOOD-VLM, ``scripts/ood/adaneg/imagenet.sh`` running
``openood/postprocessors/ttaprompt_postprocessor.py`` (``TTAPromptPostprocessor_noadagap``) on the
text features of ``openood/networks/clip_fixed_ood_prompt.py`` (``FixedCLIP_NegOODPrompt``).
Defaults from the script: L = ``memory_size`` = 10, gamma = 0.5, g = 0.5, lambda = 0.1, ng = 5 groups,
tau = 0.01 (CLIP's logit scale), task-adaptive proxies (beta = 5.5 when ``sample_adaptive``), stream
batches of 256.

``official=True`` (default) reproduces the postprocessor's scores exactly (tested against a port of
it): its memory holds ``L - 1`` images per label (cell 0 of its ``feat_memory`` is the text and a
slot counts as full when ``indice_memory == memleng``), beta is truncated to an integer
(``self.beta = int(self.args.beta)``: 5.5 acts as 5), and the entropy is
``-(p * log(p + 1e-8)).sum()``. ``official=False`` is oodscope's earlier reading: ``L`` images, beta
as given, the exact entropy.

``recipe`` chooses the text side as for NegLabel, but ``"official"`` is AdaNeg's own
(``clip_fixed_ood_prompt.py`` / ``clip_for_wordnet_prepare.py``): ID classes and noun negatives
prompted ``"The nice {}."``, adjectives ``"This is a {} photo."``; the same WordNet word files as
NegLabel (here the shipped head-word corpus), ID names and adjectives that are also nouns removed;
``ood_number = 10,000`` negatives split between the parts of speech in proportion to their sizes
(``adj_num = int(10000 * n_adj / (n_adj + n_noun))``, nouns the rest), each ranked by its sorted
cosine at index ``int(0.95 K)`` (no interpolation); adjectives first, then nouns; the last
``M mod ng`` dropped from the groups and the rest permuted by ``torch.randperm`` after
``torch.manual_seed(seed)``. ``"oodscope-v1"`` is NegLabel's v1 recipe.

Scores depend on the order of the stream (test-time adaptation): scoring the same images in another
order, or after other images, gives other scores. ``reset()`` empties the memory; the memory is part
of ``state_``, so a saved detector resumes the stream where it was. ``oodscope bench`` and the
audits score it as the official evaluator does (``fsood_evaluator_clip.py``): for each OOD set,
``reset()`` and one shuffled stream of the ID and that OOD set
(:func:`oodscope.evaluation.streams.adaptive_pair_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from oodscope.detectors._zeroshot import grouped_id_mass, softmax_entropy
from oodscope.detectors.base import DetectorError, parameters, register
from oodscope.detectors.kinds import DetectorKind
from oodscope.detectors.neglabel import NEGLABEL_RECIPES, NegLabel

_MEMORY_KEYS = ("memory_slot", "memory_feat", "memory_entropy", "memory_order", "memory_seen")

ADANEG_RECIPES: dict[str, dict[str, Any]] = {
    "official": {  # YBZh/OpenOOD-VLM (see the module docstring)
        "templates": "The nice {}.", "noun_template": "The nice {}.", "adjective_template": "This is a {} photo.",
        "corpus": "wordnet-heads", "num_negatives": 10000, "selection": "per_pos",
        "quantile": "index", "pos_order": ("adj", "noun"), "grouping": "drop",
    },
    "oodscope-v1": NEGLABEL_RECIPES["oodscope-v1"],
}


@register
class AdaNeg(NegLabel):
    name = "adaneg"
    kind = DetectorKind.TEST_TIME
    recipes: ClassVar[dict[str, dict[str, Any]]] = ADANEG_RECIPES

    @classmethod
    def inherited_parameters(cls) -> dict[str, Any]:
        """NegLabel's parameters (prompts, corpus, mining), taken as they are; ``ngroups`` is AdaNeg's own
        (5 in its official code, 100 in NegLabel's)."""
        return {k: v for k, v in parameters(NegLabel).items() if k != "classes"}

    def __init__(
        self,
        classes: Sequence[str],
        ngroups: int = 5,
        memory_size: int = 10,
        threshold: float = 0.5,
        gap: float = 0.5,
        vanilla_weight: float = 0.1,
        sample_adaptive: bool = False,
        beta: float = 5.5,
        batch_size: int = 256,
        official: bool = True,
        **neglabel_options: Any,
    ) -> None:
        super().__init__(classes, ngroups=ngroups, **neglabel_options)
        if memory_size < 1:
            raise DetectorError("adaneg: memory_size must be >= 1")
        if not 0.0 <= threshold <= 1.0 or not 0.0 <= gap <= 1.0:
            raise DetectorError("adaneg: threshold and gap must be in [0, 1]")
        if batch_size < 1:
            raise DetectorError("adaneg: batch_size must be >= 1")
        self.memory_size = memory_size
        self.threshold = threshold
        self.gap = gap
        self.vanilla_weight = vanilla_weight
        self.sample_adaptive = sample_adaptive
        self.beta = beta
        self.batch_size = batch_size
        self.official = bool(official)

    @property
    def capacity(self) -> int:
        """Images kept per label: ``memory_size - 1`` with ``official`` (as the official memory), else
        ``memory_size``."""
        return self.memory_size - 1 if self.official else self.memory_size

    @property
    def beta_(self) -> float:
        """The beta in use: ``int(beta)`` with ``official`` (the official code truncates it)."""
        return float(int(self.beta)) if self.official else float(self.beta)

    def _entropy(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.official:
            return softmax_entropy(logits)
        p = torch.softmax(logits, dim=-1)
        return -(p * torch.log(p + 1e-8)).sum(dim=-1)

    def score_chunk_rows(self) -> int:
        # Chunks handed to _score are whole stream batches, so results do not depend on chunking.
        return self.batch_size * max(1, 4096 // self.batch_size)

    # ----------------------------------------------------------------- memory
    def reset(self) -> AdaNeg:
        """Empty the memory of test images (start a new stream)."""
        for key in _MEMORY_KEYS:
            self.state_.pop(key, None)
        return self

    @property
    def memory_counts(self) -> dict[int, int]:
        """Label index (ID classes first, then negatives) -> number of cached images."""
        if "memory_slot" not in self.state_:
            return {}
        counts = (self.state_["memory_order"] >= 0).sum(dim=1)
        return {int(s): int(c) for s, c in zip(self.state_["memory_slot"], counts, strict=True)}

    def _memory(self, like: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        if "memory_slot" not in self.state_:
            return None
        dev = like.device
        return (
            self.state_["memory_slot"].to(dev, torch.long),
            self.state_["memory_feat"].to(dev, like.dtype),
            self.state_["memory_entropy"].to(dev, like.dtype),
            self.state_["memory_order"].to(dev, torch.long),
        )

    def _seen(self) -> int:
        return int(self.state_["memory_seen"][0]) if "memory_seen" in self.state_ else 0

    def _update_memory(
        self, slot: torch.Tensor, feat: torch.Tensor, entropy: torch.Tensor, order: torch.Tensor
    ) -> None:
        """Merge new entries; every slot keeps its lowest-entropy images (earlier first on ties)."""
        if len(slot) == 0 or self.capacity == 0:
            return
        old = self._memory(feat)
        if old is not None:
            m_slot, m_feat, m_ent, m_order = old
            valid = m_order >= 0
            slot = torch.cat([m_slot.unsqueeze(1).expand_as(m_order)[valid], slot])
            feat = torch.cat([m_feat[valid], feat])
            entropy = torch.cat([m_ent[valid], entropy])
            order = torch.cat([m_order[valid], order])
        # Lexicographic sort by (slot, entropy, arrival) with three stable sorts, last key first.
        perm = torch.sort(order, stable=True).indices
        perm = perm[torch.sort(entropy[perm], stable=True).indices]
        perm = perm[torch.sort(slot[perm], stable=True).indices]
        s_slot = slot[perm]
        rank = torch.arange(len(perm), device=slot.device) - torch.searchsorted(s_slot, s_slot)
        keep = rank < self.capacity
        perm, s_slot, rank = perm[keep], s_slot[keep], rank[keep]
        slots, row = torch.unique(s_slot, return_inverse=True)
        size, dim = (len(slots), self.capacity), feat.shape[1]
        new_feat = torch.zeros((*size, dim), dtype=feat.dtype, device=feat.device)
        new_ent = torch.full(size, torch.inf, dtype=entropy.dtype, device=feat.device)
        new_order = torch.full(size, -1, dtype=torch.long, device=feat.device)
        new_feat[row, rank] = feat[perm]
        new_ent[row, rank] = entropy[perm]
        new_order[row, rank] = order[perm]
        self.state_.update(memory_slot=slots, memory_feat=new_feat, memory_entropy=new_ent, memory_order=new_order)

    # ----------------------------------------------------------------- score
    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["embedding"]
        return torch.cat([self._score_batch(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])

    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        unit = self._unit(x)
        k = self.state_["class_text"].shape[0]
        texts = torch.cat([self._state("class_text", unit), self._state("negative_text", unit)])
        groups = self._groups(unit)
        logits = unit @ texts.T / self.temperature
        vanilla = grouped_id_mass(logits[:, :k], logits[:, k:], groups)

        # Selective caching of confidently-ID and confidently-OOD images.
        is_id = vanilla > self.threshold + self.gap * (1.0 - self.threshold)
        is_ood = vanilla < self.threshold - self.gap * self.threshold
        if logits.shape[1] == k:
            is_ood = torch.zeros_like(is_ood)
        slot = logits[:, :k].argmax(dim=1)
        entropy = self._entropy(logits[:, :k])
        if logits.shape[1] > k:
            slot = torch.where(is_ood, k + logits[:, k:].argmax(dim=1), slot)
            entropy = torch.where(is_ood, self._entropy(logits[:, k:]), entropy)
        cached = is_id | is_ood
        seen = self._seen()
        order = seen + torch.arange(len(unit), device=unit.device)
        self._update_memory(slot[cached], unit[cached], entropy[cached], order[cached])
        self.state_["memory_seen"] = torch.tensor([seen + len(unit)], dtype=torch.long)

        adaptive = logits.clone()
        memory = self._memory(unit)
        if memory is not None:
            slots, feat, _, m_order = memory
            valid = (m_order >= 0).to(unit.dtype)
            text = texts[slots]
            if self.sample_adaptive:
                entries = torch.cat([text.unsqueeze(1), feat], dim=1)  # (A, 1+L, D)
                mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
                sims = torch.einsum("bd,ajd->baj", unit, entries)
                weight = torch.exp(-self.beta_ * (1.0 - sims)) * mask
                gram = torch.einsum("ajd,akd->ajk", entries, entries)
                norm2 = (weight * torch.einsum("ajk,bak->baj", gram, weight)).sum(-1)
                cos = (weight * sims).sum(-1) / norm2.clamp_min(1e-30).sqrt()
            else:
                proxy = torch.nn.functional.normalize(text + (feat * valid.unsqueeze(-1)).sum(1), dim=-1)
                cos = unit @ proxy.T
            adaptive[:, slots] = cos / self.temperature
        ada = grouped_id_mass(adaptive[:, :k], adaptive[:, k:], groups)
        return -(ada + self.vanilla_weight * vanilla)
