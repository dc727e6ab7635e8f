"""An ensemble of ImageNet classifiers seen as one classifier: the mean of their class probabilities.

``create("effnet-lite0+effnet-lite2")`` (and so ``conse:effnet-lite0+effnet-lite2``). The ensemble's
``logits`` are ``log(mean_m softmax(z_m))`` over the members m, so ``softmax(logits)`` is exactly the
averaged probability: everything built on a classifier's probabilities — ConSE's convex
combination, the ``label_vocabulary`` detector, MSP — uses the ensemble unchanged. This is the one
place where members are combined (averaging probabilities is the usual classifier ensemble, and it
keeps ConSE's top-T over one distribution; concatenating two ConSE embeddings would double the
dimension for the same text space).

Images: the batch is prepared for the member with the largest input (``input_spec``); each other
member gets it resized (bicubic, antialiased) to its own size. All packaged EfficientNet-Lite
variants crop the same central 87.5 % and share the normalization, so a smaller member sees the same
field of view as with its own preprocessing, resampled once more. ``penultimate`` / ``embedding``
are the members' penultimate vectors concatenated; there is no single last linear layer
(``weight`` / ``bias`` are None), so methods that need it do not run on an ensemble.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from oodscope.backbones.base import Features


class ClassifierEnsemble:
    """Mean-probability ensemble of classifiers over the same classes (see the module docstring)."""

    def __init__(self, members: list[object]) -> None:
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two classifiers")
        specs = [m.input_spec for m in members]
        if any((s.mean, s.std) != (specs[0].mean, specs[0].std) for s in specs):
            raise ValueError("ensemble members must share their input normalization")
        self.members = list(members)
        self.id = "+".join(m.id for m in members)
        self.input_spec = max(specs, key=lambda s: s.size)
        self.device = members[0].device
        self.want_patches = False

    def weights_fingerprint(self) -> str:
        parts = "|".join(m.weights_fingerprint() for m in self.members)
        return hashlib.sha256(parts.encode()).hexdigest()[:16]

    def _resized(self, batch: torch.Tensor, size: int) -> torch.Tensor:
        if batch.shape[-1] == size and batch.shape[-2] == size:
            return batch
        return torch.nn.functional.interpolate(batch.float(), size=(size, size), mode="bicubic",
                                               align_corners=False, antialias=True)

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> Features:
        parts = [m.encode_images(self._resized(batch, m.input_spec.size)) for m in self.members]
        return combine(parts, self.id)


def combine(parts: list[Features], backbone_id: str) -> Features:
    """The ensemble's Features from its members' (same images, same classes)."""
    logits = [torch.from_numpy(np.asarray(p.logits, dtype=np.float32)) for p in parts]
    if len({tuple(x.shape) for x in logits}) != 1:
        raise ValueError("ensemble members must give logits over the same classes")
    # log of the mean probability, computed in log space: logsumexp_m log_softmax(z_m) - log M
    log_probs = torch.stack([torch.log_softmax(x.double(), dim=-1) for x in logits])
    mean_log = (torch.logsumexp(log_probs, dim=0) - np.log(len(parts))).float().numpy()
    penultimate = np.concatenate([np.asarray(p.penultimate, dtype=np.float32) for p in parts], axis=1)
    return Features(embedding=penultimate, logits=mean_log, penultimate=penultimate,
                    class_names=parts[0].class_names, backbone_id=backbone_id)
