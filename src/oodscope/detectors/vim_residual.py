"""Residual — the norm of the feature outside ViM's principal subspace.

Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022 (the
*Residual* score of its Table 1); OpenOOD v1.5 ``residual_postprocessor.py``.
"""

from __future__ import annotations

import torch

from oodscope.detectors.base import register
from oodscope.detectors.vim import ViM


@register
class ViMResidual(ViM):
    """Residual (Wang et al., CVPR 2022): ViM's residual alone, without the virtual logit.

    Score: ``||(x - u) P_perp||_2`` with ``u = -pinv(W) b`` and ``P_perp`` the eigenvectors of the
    second-moment matrix of the ID ``x - u`` beyond the top ``dim`` (OpenOOD returns its negative as
    a confidence; higher = more OOD here).
    Fit: exactly ViM's (:class:`~oodscope.detectors.vim.ViM` is the base class, so the origin, the
    subspace and the ``dim=None`` rule are the same code); ViM's ``alpha`` is fitted too but unused.
    Defaults: ``dim=None`` — ViM's width rule (1000 if width >= 2048, 512 if >= 768, else width // 2,
    the ViM authors' code), capped at ``n // 2`` fit images. OpenOOD's ``residual.yml`` fixes
    ``dim: 512``, which leaves no residual at all for its 512-d ResNet-18 features, so the width rule
    the paper used for its Residual baseline (the same D as ViM) is kept instead.
    Needs ``penultimate`` and ``weight`` (``bias`` when the backbone gives one; otherwise u = 0).
    """

    name = "vim_residual"

    def _score(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs["x"].to(torch.float64)
        self._check_width(x, self.state_["u"].shape[0])
        return ((x - self._state("u", x)) @ self._state("residual_basis", x)).norm(dim=1)
