"""k-nearest-neighbour search over an in-distribution feature bank (KNN, NNGuide, ...).

:class:`NeighborIndex` wraps three back-ends behind one ``search(queries, k)``:

- ``method="exact"``: FAISS ``IndexFlatL2`` / ``IndexFlatIP`` (brute force, exact) when ``faiss``
  can be imported, otherwise the pure-torch exact search below.
- ``method="torch"``: pure-torch exact search, on the device of the queries (GPU if they are
  there). The bank is scanned in blocks and a running top-k is merged, so memory stays bounded
  (about ``TORCH_BLOCK`` scores at a time) whatever the bank size.
- ``method="approximate"``: FAISS approximate search (needs ``faiss``), chosen by ``params``:

  * ``{"kind": "ivf"}`` (default): ``IndexIVFFlat`` — k-means coarse quantiser with ``nlist``
    cells, ``nprobe`` cells visited per query. Defaults: ``nlist = round(sqrt(M))`` capped at
    ``M // 39`` (FAISS wants >= 39 training points per centroid), ``nprobe = max(1, nlist // 8)``;
    k-means ``seed`` 1234 (FAISS's default), so rebuilding from the same bank gives the same index.
    Distances to the vectors that are visited are exact; only the candidate set is approximate.
  * ``{"kind": "hnsw"}``: ``IndexHNSWFlat`` graph with ``m=32`` links per node,
    ``ef_construction=40`` and ``ef_search=max(64, 2k)`` (must be >= k). Faster for large banks but
    its graph depends on insertion threading, so scores can differ slightly between rebuilds.

Metrics: ``"l2"`` returns squared Euclidean distances in increasing order (FAISS's convention);
``"ip"`` returns inner products in decreasing order. Values come back as float32 on the queries'
device together with int64 bank indices.

:func:`subsample_indices` draws the fraction ``alpha`` of the ID set kept in a bank (KNN's alpha,
NNGuide's bank ratio) reproducibly from a seed.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from oodscope.detectors.base import DetectorError

Metric = Literal["l2", "ip"]
METHODS = ("exact", "approximate", "torch")
#: Scores held at once by the torch search (rows x bank block), ~128 MiB of float32.
TORCH_BLOCK = 1 << 25


def faiss_module() -> Any | None:
    """The ``faiss`` module, or None when it is not installed (optional dependency)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def subsample_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of ``max(1, floor(n * fraction))`` rows drawn without replacement."""
    if not 0.0 < fraction <= 1.0:
        raise DetectorError(f"subsample fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return np.arange(n)
    count = max(1, int(n * fraction))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=count, replace=False))


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def check_search_params(k: Any, subsample: float, method: str, params: dict | None, who: str) -> None:
    """Validate what every nearest-neighbour detector takes: ``k`` (None: a rule of the bank size), ``subsample``,
    the index."""
    if k is not None and not (isinstance(k, int) and k >= 1):
        raise DetectorError(f"{who}: k must be a positive integer or None (a rule of the fit-set size), got {k!r}")
    if not 0.0 < subsample <= 1.0:
        raise DetectorError(f"{who}: subsample must be in (0, 1], got {subsample}")
    check_index_options(method, params, who)


def bank_rows(n: int, k: int | None, subsample: float, seed: int, who: str) -> np.ndarray:
    """Indices of the fitted rows kept in the bank; an error when fewer than ``k`` remain (``k=None``: no check,
    the caller picks k from the bank size)."""
    keep = subsample_indices(n, subsample, seed)
    if k is not None and len(keep) < k:
        raise DetectorError(
            f"{who}: k={k} but the ID bank has only {len(keep)} features ({n} fitted x subsample "
            f"{subsample}); lower k (k=None chooses it from the bank size) or fit on more data"
        )
    return keep


def check_index_options(method: str, params: dict | None, who: str) -> None:
    """Validate ``method`` / ``params`` early (at construction) with clear messages."""
    if method not in METHODS:
        raise DetectorError(f"{who}: index must be one of {list(METHODS)}, got {method!r}")
    params = params or {}
    if not isinstance(params, dict):
        raise DetectorError(f"{who}: index_params must be a dict or None, got {type(params).__name__}")
    kind = params.get("kind", "ivf")
    allowed = {"ivf": {"kind", "nlist", "nprobe"}, "hnsw": {"kind", "m", "ef_construction", "ef_search"}}
    if kind not in allowed:
        raise DetectorError(f"{who}: index_params['kind'] must be 'ivf' or 'hnsw', got {kind!r}")
    unknown = set(params) - allowed[kind]
    if unknown:
        raise DetectorError(f"{who}: unknown index_params for {kind!r}: {sorted(unknown)}")
    if method == "approximate" and faiss_module() is None:
        raise DetectorError(f"{who}: index='approximate' needs faiss (pip install faiss-cpu)")


class NeighborIndex:
    """Top-k search over a fixed bank (M, D); see the module docstring for the back-ends."""

    def __init__(
        self,
        bank: torch.Tensor,
        metric: Metric = "l2",
        method: str = "exact",
        params: dict | None = None,
    ) -> None:
        if metric not in ("l2", "ip"):
            raise DetectorError(f"unknown metric {metric!r}")
        if bank.ndim != 2 or len(bank) == 0:
            raise DetectorError(f"neighbour bank must be a non-empty (M, D) matrix, got {tuple(bank.shape)}")
        check_index_options(method, params, "NeighborIndex")
        self.metric = metric
        self.method = method
        self.params = dict(params or {})
        self.size, self.dim = bank.shape
        faiss = faiss_module()
        if method == "torch" or (method == "exact" and faiss is None):
            self.backend = "torch"
            self._bank = bank.detach().to(torch.float32)
            self._index = None
            return
        self._bank = None
        vectors = np.ascontiguousarray(bank.detach().to("cpu", torch.float32).numpy())
        ip = metric == "ip"
        if method == "exact":
            self.backend = "faiss-flat"
            self._index = faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
        elif self.params.get("kind", "ivf") == "ivf":
            self.backend = "faiss-ivf"
            nlist = self.params.get("nlist")
            if nlist is None:
                nlist = max(1, min(round(math.sqrt(self.size)), self.size // 39))
            nlist = int(min(nlist, self.size))
            quantizer = faiss.IndexFlatIP(self.dim) if ip else faiss.IndexFlatL2(self.dim)
            faiss_metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
            self._index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss_metric)
            self._index.train(vectors)
            self._index.nprobe = int(self.params.get("nprobe") or max(1, nlist // 8))
            self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        else:
            self.backend = "faiss-hnsw"
            m = int(self.params.get("m", 32))
            faiss_metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
            self._index = faiss.IndexHNSWFlat(self.dim, m, faiss_metric)
            self._index.hnsw.efConstruction = int(self.params.get("ef_construction", 40))
        self._index.add(vectors)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (N, k): best neighbour first."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DetectorError(
                f"queries must be (N, {self.dim}) to match the fitted bank, got {tuple(queries.shape)}"
            )
        if not 1 <= k <= self.size:
            raise DetectorError(f"k={k} must be between 1 and the bank size {self.size}")
        if self._index is None:
            return self._torch_search(queries, k)
        if self.backend == "faiss-hnsw":
            self._index.hnsw.efSearch = int(self.params.get("ef_search") or max(64, 2 * k))
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        values, index = self._index.search(q, k)
        if (index < 0).any():
            # IVF with few probed cells (or HNSW with a small ef) can return fewer than k hits.
            raise DetectorError(
                f"approximate search found fewer than k={k} neighbours; raise nprobe / ef_search"
            )
        return (
            torch.from_numpy(values).to(queries.device),
            torch.from_numpy(index.astype(np.int64)).to(queries.device),
        )

    def _torch_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self._bank
        if bank.device != queries.device:
            bank = self._bank = bank.to(queries.device)
        q = queries.to(torch.float32)
        ip = self.metric == "ip"
        bank_sq = None if ip else (bank * bank).sum(dim=1)
        rows = max(1, min(len(q), TORCH_BLOCK // max(1, min(self.size, 1 << 16))))
        block = max(k, TORCH_BLOCK // rows)
        out_v, out_i = [], []
        for r0 in range(0, len(q), rows):
            qr = q[r0 : r0 + rows]
            q_sq = None if ip else (qr * qr).sum(dim=1, keepdim=True)
            best_v = best_i = None
            for b0 in range(0, self.size, block):
                sims = qr @ bank[b0 : b0 + block].T
                # Rank by a "larger is better" key: inner product, or minus squared distance.
                key = sims if ip else -(q_sq + bank_sq[b0 : b0 + block][None, :] - 2.0 * sims).clamp_min(0.0)
                idx = torch.arange(b0, b0 + key.shape[1], device=q.device).expand(len(qr), -1)
                if best_v is not None:
                    key = torch.cat([best_v, key], dim=1)
                    idx = torch.cat([best_i, idx], dim=1)
                top = torch.topk(key, min(k, key.shape[1]), dim=1)
                best_v, best_i = top.values, torch.gather(idx, 1, top.indices)
            out_v.append(best_v if ip else -best_v)
            out_i.append(best_i)
        return torch.cat(out_v), torch.cat(out_i)
