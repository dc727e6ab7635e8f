"""Scoring test-time-adaptive detectors (AdaNeg, ``fit_needs().adaptive``) on ID/OOD pairs.

Their scores depend on everything seen since the last ``reset()``. The official AdaNeg evaluator
(YBZh/OpenOOD-VLM ``openood/evaluators/fsood_evaluator_clip.py``) calls ``reset_memory()`` for each
OOD set and scores one shuffled stream of the ID set and that OOD set (``ConcatDataset`` +
``DataLoader(shuffle=True)``), taking the ID scores from that same stream. :func:`adaptive_pair_scores`
does that with a seeded permutation; ``oodscope bench`` and the audits (prompt and corruption) both
use it, so no memory leaks from one OOD set into the next.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from oodscope.backbones.base import Features

#: What result rows and reports say about a test-time-adaptive detector's numbers.
ADAPTIVE_PROTOCOL_NOTE = "test-time adaptive: reset per OOD set, seeded shuffled ID+OOD stream"
#: The seed of ``oodscope bench``'s streams (the audits pass their own).
DEFAULT_STREAM_SEED = 0


def is_adaptive(detector: Any) -> bool:
    """Test-time adaptive: its scores depend on the stream it has seen (declared by its kind)."""
    return bool(detector.fit_needs().adaptive)


def adaptive_pair_scores(detector: Any, id_features: Features, ood_features: Features,
                         seed: int = DEFAULT_STREAM_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(ID scores, OOD scores) of one pair: ``reset()``, then one stream of the ID and OOD images in a
    seeded random order (``numpy.random.default_rng(seed).permutation``), scores put back in set order."""
    both = Features.concatenate([id_features, ood_features])
    order = np.random.default_rng(seed).permutation(len(both))
    detector.reset()
    shuffled = np.asarray(detector.score(both.subset(order)), dtype=np.float64)
    scores = np.empty_like(shuffled)
    scores[order] = shuffled
    n_id = len(id_features)
    return scores[:n_id], scores[n_id:]
