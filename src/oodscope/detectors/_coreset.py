"""Greedy k-center coreset selection for PatchCore's memory bank, streamed over chunks of patches.

PatchCore (Roth et al., CVPR 2022, Section 3.2) keeps a subset ``M_C`` of the training patch
features chosen by the greedy k-center rule of Sener & Savarese (ICLR 2018) / Gonzalez (1985):
start from one point, then repeatedly add the point farthest from the points chosen so far,
``m_i = argmax_m min_{n in M_C} ||psi(m) - psi(n)||``, where ``psi`` is a Johnson-Lindenstrauss
random projection (here a sparse random projection, as anomalib's ``KCenterGreedy``; the official
``patchcore-inspection`` code uses a random linear map, both to 128 dimensions there).

:class:`StreamingGreedyCoreset` runs that rule one *chunk* of patches at a time ("incremental
greedy"): a new chunk's distances to the points already chosen are computed once (a blocked matrix
product), then greedy picks are taken from that chunk until the bank holds ``ratio`` of all patches
seen so far; chosen points are never removed. It holds the bank (full features and projections) and
one chunk, never all patches: memory is bounded by the bank plus one chunk, not by the number of
training patches.

Relation to the exact greedy. With a single chunk it *is* the exact greedy (same start, same
order of picks, ties to the lowest index, as ``np.argmax``); ``mode="exact"`` of PatchCore feeds
everything as one chunk. With several chunks a patch of an earlier chunk is not reconsidered after
its chunk, so the selection differs from the exact greedy. What is guaranteed instead is a bound,
computed during the stream and stored (:class:`Certificate`), on the covering radius ``R`` (the
largest distance of any training patch to its nearest bank point, in the projected space) relative
to the optimal k-center radius ``r*`` for the same bank size (centres anywhere in space):

- every patch of chunk ``i`` was within ``r_i`` of the bank when its chunk ended, and the bank only
  grows, so ``R <= R_up = max_i r_i``;
- every pick was at distance ``delta_t`` from all earlier picks when it was taken, and the farthest
  patch of the last chunk is at ``r_last`` from the final bank, so the bank plus that patch are
  ``|M_C| + 1`` points pairwise at least ``L = min(min_t delta_t, r_last)`` apart; two of them share a
  ball of any ``|M_C|``-ball cover, hence ``r* >= L / 2``;
- so ``R <= rho * r*`` with ``rho = R_up / (L / 2)``. For one chunk ``L = r_last = R`` and
  ``rho = 2``: Gonzalez's 2-approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

#: Elements of the (chunk x bank-block) distance temporary when a chunk meets the bank (~4 MiB float32).
DISTANCE_BLOCK = 1 << 20


def sparse_random_projection(d_in: int, d_out: int, seed: int) -> np.ndarray:
    """(d_in, d_out) float32 "very sparse" random projection (Li, Hastie & Church, KDD 2006).

    Entries are ``+-sqrt(s / d_out)`` with probability ``1 / (2 s)`` each and 0 otherwise, with
    ``s = sqrt(d_in)`` — scikit-learn's ``SparseRandomProjection(density="auto")``, which anomalib's
    PatchCore uses. Squared norms are preserved in expectation. Stored dense: it is small (D x 128).
    """
    rng = np.random.default_rng(seed)
    s = math.sqrt(d_in)
    u = rng.random((d_in, d_out))
    signs = np.where(rng.random((d_in, d_out)) < 0.5, -1.0, 1.0)
    keep = u < 1.0 / s
    return (keep * signs * math.sqrt(s / d_out)).astype(np.float32)


@dataclass
class Certificate:
    """The bound of the module docstring: covering radius ``R <= radius_upper`` and ``r* >= lower_bound``."""

    radius_upper: float
    lower_bound: float  # L / 2

    @property
    def ratio(self) -> float:
        """``rho = radius_upper / lower_bound`` (1 when everything is covered exactly; inf when L = 0 < R_up)."""
        if self.radius_upper == 0.0:
            return 1.0
        return math.inf if self.lower_bound == 0.0 else self.radius_upper / self.lower_bound

    def as_dict(self) -> dict:
        ratio = self.ratio
        return {
            "radius_upper": self.radius_upper,
            "optimal_radius_lower_bound": self.lower_bound,
            "approximation_ratio": None if math.isinf(ratio) else ratio,
        }


class StreamingGreedyCoreset:
    """Incremental greedy k-center over chunks (see the module docstring).

    ``total``: number of patches that will be streamed (fixes the final bank size
    ``max(1, int(ratio * total))``, PatchCore's ``int(len(features) * percentage)``); ``projection``:
    (D, d') matrix or None (greedy on the features themselves); ``seed``: the first pick is a uniform
    draw from the first chunk (anomalib's start; the official exact sampler starts elsewhere).
    """

    def __init__(self, total: int, ratio: float, projection: np.ndarray | None, seed: int = 0) -> None:
        if total < 1:
            raise ValueError("no patches to select from")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        self.total = int(total)
        self.ratio = float(ratio)
        self.target = max(1, int(self.ratio * self.total))
        self.projection = projection
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        # The bank is allocated once at its final size (known from `total`) when the width is known,
        # and picks are written in place: no growing copies, memory = the bank + one chunk.
        self._full = np.zeros((0, 0), np.float32)  # chosen full features (target, D)
        self._proj = np.zeros((0, 0), np.float32)  # their projections (target, d')
        self._proj_sq = np.zeros(0, np.float32)
        self.size = 0
        self.indices: list[int] = []  # global patch indices of the picks, in pick order
        self.min_delta = math.inf
        self.radius_upper = 0.0
        self.radius_last = 0.0

    def _project(self, x: np.ndarray) -> np.ndarray:
        if self.projection is None:
            return x
        q = np.empty((len(x), self.projection.shape[1]), np.float32)
        torch.mm(torch.from_numpy(x), torch.from_numpy(self.projection), out=torch.from_numpy(q))
        return q

    def _distances_to_bank(self, q: torch.Tensor, q_sq: torch.Tensor) -> np.ndarray:
        """Squared distance of each row of ``q`` to its nearest chosen point, in blocks of the bank."""
        best = np.full(len(q), np.inf, np.float32)
        t_best = torch.from_numpy(best)
        bank = torch.from_numpy(self._proj[: self.size])
        bank_sq = torch.from_numpy(self._proj_sq[: self.size])
        block = max(1, DISTANCE_BLOCK // max(1, len(q)))
        buffer = np.empty(len(q) * min(block, len(bank)), np.float32)  # numpy-owned: tracemalloc sees it
        for b0 in range(0, len(bank), block):
            width = min(block, len(bank) - b0)
            d2 = torch.from_numpy(buffer[: len(q) * width]).view(len(q), width)
            # ||b||^2 - 2 q.b in one fused pass; ||q||^2 is the same for every b, added after the min.
            torch.addmm(bank_sq[None, b0 : b0 + width], q, bank[b0 : b0 + width].T, beta=1.0, alpha=-2.0, out=d2)
            torch.minimum(t_best, d2.amin(dim=1), out=t_best)
        t_best.add_(q_sq).clamp_(min=0.0)
        return best

    def add(self, x: np.ndarray) -> None:
        """Stream one chunk (n, D) float32 of patch features: pick from it up to the running budget."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.seen + len(x) > self.total:
            raise ValueError(f"streamed more than the announced {self.total} patches")
        offset, self.seen = self.seen, self.seen + len(x)
        if len(x) == 0:
            return
        # The arithmetic runs in torch on views of numpy-owned buffers: torch's CPU kernels stay fast
        # when the machine is shared (a threaded OpenBLAS matrix-vector product does not), and every
        # large buffer is numpy's, so tracemalloc accounts for it.
        q_np = self._project(x)
        q = torch.from_numpy(q_np)
        q_sq_np = np.empty(len(x), np.float32)
        q_sq = torch.from_numpy(q_sq_np)
        torch.sum(q * q, dim=1, out=q_sq)
        # Budget after this chunk: ratio of the patches seen so far (the final one is exactly `target`).
        budget = self.target if self.seen == self.total else max(1, int(self.ratio * self.seen))
        picks: list[int] = []
        d2_np = np.empty(len(x), np.float32)
        d2 = torch.from_numpy(d2_np)
        if not self.indices:
            first = int(self.rng.integers(len(x)))
            picks.append(first)
            mind_np = np.empty(len(x), np.float32)
            mind = torch.from_numpy(mind_np)
            torch.addmv(q_sq, q, q[first], beta=1.0, alpha=-2.0, out=mind)
            mind.add_(q_sq[first]).clamp_(min=0.0)
            mind[first] = 0.0
        else:
            mind_np = self._distances_to_bank(q, q_sq)
            mind = torch.from_numpy(mind_np)
        while len(self.indices) + len(picks) < budget:
            j = int(torch.argmax(mind))  # ties: the first maximal index, as np.argmax
            top = float(mind[j])
            if top <= 0.0:  # every patch of the chunk is already a bank point: nothing left to cover
                break
            self.min_delta = min(self.min_delta, math.sqrt(top))
            picks.append(j)
            torch.addmv(q_sq, q, q[j], beta=1.0, alpha=-2.0, out=d2)
            d2.add_(q_sq[j])
            torch.minimum(mind, d2, out=mind)
            mind[j] = 0.0
        self.radius_last = math.sqrt(max(0.0, float(mind.max())))
        self.radius_upper = max(self.radius_upper, self.radius_last)
        if picks:
            if self.size == 0:
                self._full = np.empty((self.target, x.shape[1]), np.float32)
                self._proj = np.empty((self.target, q_np.shape[1]), np.float32)
                self._proj_sq = np.empty(self.target, np.float32)
            rows = np.asarray(picks)
            end = self.size + len(rows)
            np.take(x, rows, axis=0, out=self._full[self.size : end])
            np.take(q_np, rows, axis=0, out=self._proj[self.size : end])
            np.take(q_sq_np, rows, out=self._proj_sq[self.size : end])
            self.size = end
            self.indices.extend(offset + p for p in picks)

    def bank(self) -> np.ndarray:
        """The chosen full features (M, D), in pick order."""
        if self.seen != self.total:
            raise ValueError(f"only {self.seen} of the announced {self.total} patches were streamed")
        return self._full[: self.size]

    def certificate(self) -> Certificate:
        return Certificate(self.radius_upper, min(self.min_delta, self.radius_last) / 2.0)
