"""WeiPer — OOD detection on randomly perturbed copies of the class projections.

Granz, Heurich & Landgraf, "WeiPer: OOD Detection using Weight Perturbations of Class
Projections", NeurIPS 2024; official code ``mgranz/weiper`` (an OpenOOD integration:
``openood/postprocessors/weiper_kldiv/utils.py``, ``weiper_kldiv_postprocessor.py`` and
``configs/postprocessors/weiper_kldiv.yml``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oodscope.detectors import _gaussian as g
from oodscope.detectors._shaping import linear_head
from oodscope.detectors.base import Detector, DetectorError, register
from oodscope.detectors.kinds import DetectorKind

VARIANTS = ("kld", "msp")
#: The official histogram's upper edge is ``max + 1e-8`` so that the maximum falls inside the last bin.
EDGE_EPS = 1e-8
#: Perturbed logits held per scoring chunk (rows x r x C), ~128 MiB of float64.
CHUNK_LOGITS = 1 << 24


def perturbation_directions(seed: int, repeats: int, classes: int, width: int) -> torch.Tensor:
    """(r, C, D) float32 unit rows drawn from a seeded standard normal (the official ``F.normalize(randn)``,
    float32 like the official weights: r x C x D values are 800 MB for ImageNet's 100 x 1000 x 2048)."""
    generator = torch.Generator().manual_seed(int(seed))
    return F.normalize(torch.randn(repeats, classes, width, generator=generator, dtype=torch.float32), dim=2)


def perturbed_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, directions: torch.Tensor,
                     delta: float) -> torch.Tensor:
    """(N, r, C) logits of the r perturbed heads ``W + delta * ||w_c|| * n_rc`` (same bias), in h's dtype.

    Written as ``h W^T + b + delta ||w_c|| (h . n_rc)``, one repeat at a time, so neither the (r, C, D)
    perturbed heads nor a float64 copy of all directions is ever formed.
    """
    scale = delta * weight.norm(dim=1)  # the noise is proportional to each class row's length
    base = h @ weight.T + bias
    return torch.stack([base + scale * (h @ d.to(h).T) for d in directions], dim=1)


def histogram(values: torch.Tensor, low: float, high: float, bins: int) -> torch.Tensor:
    """(N, bins) fraction of each row's values in each of ``bins`` equal bins over ``[low, high + 1e-8)``.

    As the official ``batch_histogram(..., probability=True)`` per image: values outside the
    range fall in two outer bins that are then dropped, so a row need not sum to 1.
    """
    edges = low + torch.arange(bins + 1, dtype=torch.float64, device=values.device) / bins * (high + EDGE_EPS - low)
    index = torch.bucketize(values.contiguous(), edges, right=True) - 1  # bin i: edges[i] <= v < edges[i + 1]
    inside = (index >= 0) & (index < bins)
    counts = torch.zeros(len(values), bins + 1, dtype=torch.float64, device=values.device)
    counts.scatter_add_(1, torch.where(inside, index, torch.full_like(index, bins)), inside.to(torch.float64))
    return counts[:, :bins] / values.shape[1]


def smooth(density: torch.Tensor, size: int) -> torch.Tensor:
    """Moving average of width ``size`` along the bins, edge values repeated (the official ``UniformKernel``:
    ``Conv1d(padding="same", padding_mode="replicate")``, which pads ``(size - 1) // 2`` on the left)."""
    left = (size - 1) // 2
    padded = F.pad(density[:, None, :], (left, size - 1 - left), mode="replicate")
    return F.avg_pool1d(padded, size, stride=1)[:, 0, :]


def symmetric_kl(mean_density: torch.Tensor, density: torch.Tensor, eps: float, size: int) -> torch.Tensor:
    """(N,) ``KL(p || q) + KL(q || p)`` of the ID mean density p and each smoothed row q, both + eps and
    normalised (the official ``kldiv``: only q is smoothed)."""
    q = smooth(density, size) + eps
    p = (mean_density + eps)[None, :]
    p, q = p / p.sum(dim=1, keepdim=True), q / q.sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)


@register
class WeiPer(Detector):
    """WeiPer (Granz et al., NeurIPS 2024): scores on r randomly perturbed copies of the last layer.

    Score (``variant="kld"``, WeiPer+KLD): ``KL_s1(z) + lambda_1 KL_s2(W~ z) - lambda_2 MSP~(z)``, where
    ``W~`` stacks r copies of the class projections ``w_c + delta ||w_c|| n_rc`` (``n_rc`` random unit
    vectors), ``KL_s(v)`` is the symmetric KL divergence between the histogram (``n_bins`` bins over
    the ID range) of the entries of ``v`` — smoothed by a width-s moving average — and the mean ID
    histogram, and ``MSP~`` is the mean over the r copies of the maximum softmax probability (the
    official score is the negative, an ID confidence). ``variant="msp"`` (WeiPer+MSP): ``-MSP~(z)``.
    Fit (KLD): the global min / max of the ID penultimate entries and of the ID perturbed logits
    (official ``exact_minmax: true``) and the mean ID histograms; the MSP variant only checks shapes.
    Defaults: ``variant="kld"`` — the paper's headline method and the only one the official code
    ships as a postprocessor; ``n_repeats=100``, ``delta=1.8``, ``n_bins=100``, ``lambda_1=2.5``,
    ``lambda_2=0.1``, ``smoothing=4``, ``smoothing_perturbed=15`` (official ``weiper_kldiv.yml``, the
    README's CIFAR-10 / ResNet-18 column; ImageNet ResNet-50 uses delta 2.4, lambda_2 0.25,
    smoothing 40), ``epsilon=0.01``, ``epsilon_perturbed=0.025`` (``calculate_WeiPerKLDiv_score``).
    The perturbation is drawn from ``seed`` (the official code draws it unseeded on every setup);
    it is regenerated from the seed, not saved.
    """

    name = "weiper"
    kind = DetectorKind.FEATURE
    requires = ("penultimate", "weight", "bias")
    needs_fit = True

    def __init__(
        self,
        variant: str = "kld",
        n_repeats: int = 100,
        delta: float = 1.8,
        n_bins: int = 100,
        lambda_1: float = 2.5,
        lambda_2: float = 0.1,
        smoothing: int = 4,
        smoothing_perturbed: int = 15,
        epsilon: float = 0.01,
        epsilon_perturbed: float = 0.025,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise DetectorError(f"{self.name}: variant must be one of {list(VARIANTS)}, got {variant!r}")
        for key, value in (("n_repeats", n_repeats), ("n_bins", n_bins), ("smoothing", smoothing),
                           ("smoothing_perturbed", smoothing_perturbed)):
            if not (isinstance(value, int) and value >= 1):
                raise DetectorError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        if not delta >= 0:
            raise DetectorError(f"{self.name}: delta must be >= 0, got {delta}")
        if not (epsilon > 0 and epsilon_perturbed > 0):
            raise DetectorError(f"{self.name}: epsilon and epsilon_perturbed must be > 0")
        self.variant = variant
        self.n_repeats = n_repeats
        self.delta = float(delta)
        self.n_bins = n_bins
        self.lambda_1 = float(lambda_1)
        self.lambda_2 = float(lambda_2)
        self.smoothing = smoothing
        self.smoothing_perturbed = smoothing_perturbed
        self.epsilon = float(epsilon)
        self.epsilon_perturbed = float(epsilon_perturbed)
        self.seed = int(seed)
        self._directions: tuple[tuple, torch.Tensor] | None = None

    def score_chunk_rows(self) -> int:
        # Bounds the (rows, r, C) perturbed logits; C is only known from the fitted state.
        classes = int(self.fit_info_.get("classes", 1000))
        return max(1, min(int(self.score_batch_size), CHUNK_LOGITS // (self.n_repeats * classes)))

    def directions(self, classes: int, width: int, device: torch.device) -> torch.Tensor:
        """The seeded unit perturbations (r, C, D), drawn once per shape and cached on the instance."""
        key = (self.seed, self.n_repeats, classes, width, str(device))
        if self._directions is None or self._directions[0] != key:
            self._directions = (key, perturbation_directions(self.seed, self.n_repeats, classes, width).to(device))
        return self._directions[1]

    def _perturbed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = inputs["penultimate"].to(torch.float64)
        logits = linear_head(h, inputs["weight"], inputs["bias"], self.name)  # shape checks
        weight = inputs["weight"].to(h)
        directions = self.directions(weight.shape[0], weight.shape[1], h.device)
        return h, perturbed_logits(h, weight, inputs["bias"].to(h), directions, self.delta).reshape(len(logits), -1)

    def _perturbed_msp(self, perturbed: torch.Tensor) -> torch.Tensor:
        return torch.softmax(perturbed.reshape(len(perturbed), self.n_repeats, -1), dim=2).amax(dim=2).mean(dim=1)

    def _fit(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> None:
        h = g.check_matrix(inputs["penultimate"], self.name)
        self.fit_info_["classes"] = int(inputs["weight"].shape[0])
        self.fit_info_["width"] = int(h.shape[1])
        if self.variant == "msp":
            linear_head(h[:1], inputs["weight"], inputs["bias"], self.name)
            return
        rows = self.score_chunk_rows()
        low = high = low_p = high_p = None
        chunks = []
        for start in range(0, len(h), rows):  # two passes: the range first, then the histograms in it
            z, perturbed = self._perturbed({**inputs, "penultimate": h[start : start + rows]})
            chunks.append((start, start + rows))
            low = min(float(z.min()), low) if low is not None else float(z.min())
            high = max(float(z.max()), high) if high is not None else float(z.max())
            low_p = min(float(perturbed.min()), low_p) if low_p is not None else float(perturbed.min())
            high_p = max(float(perturbed.max()), high_p) if high_p is not None else float(perturbed.max())
        self.fit_info_["range"] = [low, high]
        self.fit_info_["range_perturbed"] = [low_p, high_p]
        total = torch.zeros(self.n_bins, dtype=torch.float64, device=h.device)
        total_p = torch.zeros_like(total)
        for start, stop in chunks:
            z, perturbed = self._perturbed({**inputs, "penultimate": h[start:stop]})
            total += histogram(z, low, high, self.n_bins).sum(dim=0)
            total_p += histogram(perturbed, low_p, high_p, self.n_bins).sum(dim=0)
        self.state_["density"] = total / len(h)
        self.state_["density_perturbed"] = total_p / len(h)

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        width = self.fit_info_["width"]
        if inputs["penultimate"].ndim != 2 or inputs["penultimate"].shape[1] != width:
            raise DetectorError(
                f"{self.name}: fitted on {width}-d penultimate, got shape {tuple(inputs['penultimate'].shape)}"
            )
        z, perturbed = self._perturbed(inputs)
        msp = self._perturbed_msp(perturbed)
        if self.variant == "msp":
            return -msp
        kl = symmetric_kl(self._state("density", z), histogram(z, *self.fit_info_["range"], self.n_bins),
                          self.epsilon, self.smoothing)
        kl_perturbed = symmetric_kl(
            self._state("density_perturbed", z),
            histogram(perturbed, *self.fit_info_["range_perturbed"], self.n_bins),
            self.epsilon_perturbed,
            self.smoothing_perturbed,
        )
        return kl + self.lambda_1 * kl_perturbed - self.lambda_2 * msp
