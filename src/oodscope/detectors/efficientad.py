"""EfficientAD — a PDN student-teacher pair and an autoencoder, trained on the normal images.

Batzner, Heckler & König, "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level
Latencies", WACV 2024 (arXiv:2303.14535); anomalib's ``models/image/efficient_ad`` as the reference
code. Networks, losses and helpers: :mod:`oodscope.detectors._efficientad`.

Formula: ``map = 0.5 * n_ST(mean_c (T(x) - S_1(x))^2) + 0.5 * n_AE(mean_c (A(x) - S_2(x))^2)`` with
``n(M) = 0.1 (M - q_a) / (q_b - q_a)`` from the q_a = 0.9 and q_b = 0.995 quantiles of the maps of
held-out normal images; image score ``max map``.

Training (paper Sec. 3.2-3.3, appendix A.1): the student S (PDN-S, 768 channels) learns the teacher T
(normalised per channel over the training images) with the hard-feature loss -- the mean of the
squared differences at or above their 0.999 quantile -- plus the penalty ``mean(S_1(P)^2)`` on
images P that are not from the category (the paper: ImageNet); the autoencoder A learns T on
augmented images (brightness / contrast / saturation, factor U(0.8, 1.2)), and the student's second
half S_2 learns A's output. Adam with weight decay 1e-5, lr divided by 10 after 95 % of the steps,
batch 1 (paper and anomalib).

Defaults and their sources: ``q_hard = 0.999``, ``q_a = 0.9``, ``q_b = 0.995``, ``batch_size = 1``,
weight decay 1e-5 (paper, anomalib ``lightning_model.py``). Departures (CPU, minutes instead of the
paper's GPU hour): ``image_size = 128`` (paper 256), ``steps = 300`` (paper 70 000), ``lr = 1e-3``
(paper 1e-4, for the 230x shorter schedule); the teacher is distilled from the packaged
EfficientNet-Lite0 on offline images (``scripts/build_efficientad_teacher.py``; the paper's from an
ImageNet WideResNet-101), whose file also holds the penalty crops (offline photographs and
textures instead of ImageNet); the autoencoder's last encoder convolution has kernel
``image_size / 32`` (the paper's 8 at 256 px) so that the code stays 1 x 1; the quantiles are taken
over the grid cells (anomalib: over the bilinearly upsampled pixels, its zero padding included) of
``validation_fraction`` of the fit images, held out of training (anomalib: the validation split).
The map is at the image_size / 4 grid, padded by 4 cells (anomalib's ``pad_maps``); the image score is
its maximum (anomalib takes it after upsampling).

It needs the images themselves at fit time (an :class:`~oodscope.detectors._anomaly.ImageAnomalyDetector`):
``fit(parts=backbone.classifier_parts() or its InputSpec, images=normal_images)``, then
``score_image_maps(parts, images)``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oodscope.detectors._anomaly import ImageAnomalyDetector
from oodscope.detectors._efficientad import (
    OUT_CHANNELS,
    AutoEncoder,
    PDNSmall,
    Teacher,
    augment,
    hard_loss,
    load_teacher,
    pad_map,
    pixels_to_input,
    quantile_normalize,
    train_steps_lr,
)
from oodscope.detectors.base import DetectorError, register

_TEACHER: Teacher | None = None


def packaged_teacher() -> Teacher:
    """The packaged teacher, loaded once per process."""
    global _TEACHER
    if _TEACHER is None:
        _TEACHER = load_teacher()
    return _TEACHER


@register
class EfficientAD(ImageAnomalyDetector):
    """EfficientAD-S (Batzner, Heckler & König, WACV 2024); see the module docstring for the formula,
    the defaults and what departs from the paper."""

    name = "efficientad"

    def __init__(
        self,
        image_size: int = 128,
        steps: int = 300,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        batch_size: int = 1,
        q_hard: float = 0.999,
        q_a: float = 0.9,
        q_b: float = 0.995,
        penalty: bool = True,
        validation_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if image_size < 64 or image_size % 32:
            raise DetectorError(f"efficientad: image_size must be a multiple of 32 and >= 64, got {image_size}")
        if steps < 1 or batch_size < 1:
            raise DetectorError(f"efficientad: steps and batch_size must be >= 1, got {steps}, {batch_size}")
        if not 0.0 < q_hard < 1.0 or not 0.0 < q_a < q_b < 1.0:
            raise DetectorError(f"efficientad: need 0 < q_hard < 1 and 0 < q_a < q_b < 1, got {q_hard}, {q_a}, {q_b}")
        if not 0.0 <= validation_fraction < 1.0:
            raise DetectorError(f"efficientad: validation_fraction must be in [0, 1), got {validation_fraction}")
        self.image_size = image_size
        self.steps = steps
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.q_hard = q_hard
        self.q_a = q_a
        self.q_b = q_b
        self.penalty = penalty
        self.validation_fraction = validation_fraction
        self.seed = seed
        self._nets: tuple[PDNSmall, AutoEncoder] | None = None

    # ------------------------------------------------------------------ networks
    def _resize(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if pixels.shape[-2:] == (s, s):
            return pixels
        return F.interpolate(pixels, size=(s, s), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)

    def _networks(self) -> tuple[PDNSmall, AutoEncoder]:
        """Student and autoencoder, rebuilt from ``state_`` (after fit or load), eval mode."""
        if self._nets is None:
            with torch.random.fork_rng(devices=[]):  # their initial weights are overwritten: leave the RNG alone
                student, ae = PDNSmall(2 * OUT_CHANNELS), AutoEncoder(self.image_size)
            for prefix, net in (("student.", student), ("ae.", ae)):
                net.load_state_dict({k[len(prefix):]: v for k, v in self.state_.items() if k.startswith(prefix)})
            self._nets = (student.eval().requires_grad_(False), ae.eval().requires_grad_(False))
        return self._nets

    def _teacher(self) -> Teacher:
        teacher = packaged_teacher()
        want = self.fit_info_.get("teacher_sha256")
        if want is not None and want != teacher.sha256:
            raise DetectorError(f"efficientad: fitted with teacher {want}, but the packaged teacher is "
                                f"{teacher.sha256}; refit the detector")
        return teacher

    def teacher_output(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's map of network inputs ``x``, normalised per channel by the training images' stats."""
        t = self._teacher().network(x)
        return (t - self.state_["teacher_mean"]) / self.state_["teacher_std"]

    def raw_maps(self, pixels: torch.Tensor, student: PDNSmall | None = None,
                 ae: AutoEncoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised local (student-teacher) and global (student-autoencoder) maps (N, h, w) of
        [0, 1] pixels at the unpadded grid."""
        if student is None:
            student, ae = self._networks()
        x = pixels_to_input(self._resize(pixels))
        t = self.teacher_output(x)
        s = student(x)
        a = ae(x)
        map_st = (t - s[:, :OUT_CHANNELS]).pow(2).mean(dim=1)
        map_ae = (a - s[:, OUT_CHANNELS:]).pow(2).mean(dim=1)
        return map_st, map_ae

    # ------------------------------------------------------------------ fit
    def _fit_pixels(self, pixels: torch.Tensor) -> None:
        started = time.perf_counter()
        pixels = self._resize(pixels)
        n = len(pixels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(self.validation_fraction * n)) if n >= 2 else 0
        if self.validation_fraction > 0 and n >= 2:
            n_val = min(max(1, n_val), n - 1)
        val, train = pixels[order[:n_val]], pixels[order[n_val:]]
        if n_val == 0:
            val = train
            if self.validation_fraction > 0:
                self._caution("one fit image: the map quantiles come from the training image itself")
        teacher = self._teacher()
        with torch.no_grad():
            outs = torch.cat([teacher.network(pixels_to_input(b)) for b in train.split(16)])
        mean = outs.mean(dim=(0, 2, 3), keepdim=True)
        std = outs.std(dim=(0, 2, 3), keepdim=True, correction=0).clamp_min(1e-6)
        del outs
        self.state_ = {"teacher_mean": mean, "teacher_std": std}
        self.fit_info_["teacher_sha256"] = teacher.sha256
        penalty = self._resize(teacher.penalty.float() / 255.0) if self.penalty else None

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # initial weights and dropout masks: a function of the seed
            gen = torch.Generator().manual_seed(self.seed + 1)
            student, ae = PDNSmall(2 * OUT_CHANNELS), AutoEncoder(self.image_size)
            params = list(student.parameters()) + list(ae.parameters())
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
            student.train()
            ae.train()
            losses = []
            for step in range(self.steps):
                for group in opt.param_groups:
                    group["lr"] = train_steps_lr(step, self.steps, self.lr)
                batch = train[torch.randint(len(train), (self.batch_size,), generator=gen)]
                x = pixels_to_input(batch)
                with torch.no_grad():
                    t = self.teacher_output(x)
                s = student(x)[:, :OUT_CHANNELS]
                loss_st = hard_loss((t - s).pow(2), self.q_hard, generator=gen)
                if penalty is not None:
                    p = penalty[torch.randint(len(penalty), (self.batch_size,), generator=gen)]
                    loss_st = loss_st + student(pixels_to_input(p))[:, :OUT_CHANNELS].pow(2).mean()
                xa = pixels_to_input(augment(batch, gen))
                a = ae(xa)
                with torch.no_grad():
                    ta = self.teacher_output(xa)
                sa = student(xa)[:, OUT_CHANNELS:]
                loss_ae = (ta - a).pow(2).mean()
                loss_stae = (a - sa).pow(2).mean()
                loss = loss_st + loss_ae + loss_stae
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append((loss_st.item(), loss_ae.item(), loss_stae.item()))
        for name, net in (("student", student), ("ae", ae)):
            for k, v in net.state_dict().items():
                self.state_[f"{name}.{k}"] = v.detach().clone()
        self._nets = None
        student, ae = self._networks()
        with torch.no_grad():
            maps = [self.raw_maps(b) for b in val.split(16)]
        st = torch.cat([m[0] for m in maps]).reshape(-1)
        ae_maps = torch.cat([m[1] for m in maps]).reshape(-1)
        q = torch.tensor([self.q_a, self.q_b], dtype=st.dtype)
        self.state_["quantiles_st"] = torch.quantile(st, q)
        self.state_["quantiles_ae"] = torch.quantile(ae_maps, q)
        last = np.asarray(losses[-max(1, len(losses) // 10):]).mean(axis=0)
        self.fit_info_.update({
            "n_train": int(len(train)), "n_validation": int(n_val), "steps": int(self.steps),
            "train_seconds": round(time.perf_counter() - started, 2),
            "final_losses": {"st": float(last[0]), "ae": float(last[1]), "stae": float(last[2])},
        })

    # ------------------------------------------------------------------ score
    def normalized_maps(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantile-normalised local and global maps (N, h + 8, w + 8), padded as anomalib's."""
        map_st, map_ae = self.raw_maps(pixels)
        qst, qae = self.state_["quantiles_st"], self.state_["quantiles_ae"]
        eps = 1e-12  # a constant validation map would give q_b == q_a
        n_st = quantile_normalize(pad_map(map_st), float(qst[0]), max(float(qst[1]), float(qst[0]) + eps))
        n_ae = quantile_normalize(pad_map(map_ae), float(qae[0]), max(float(qae[1]), float(qae[0]) + eps))
        return n_st, n_ae

    def _score_pixel_maps(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_st, n_ae = self.normalized_maps(pixels)
        amap = 0.5 * n_st + 0.5 * n_ae
        return amap.flatten(1).amax(dim=1), amap

    def _fit_from(self, inputs: Any, labels: Any, **options: Any) -> None:
        self._nets = None
        super()._fit_from(inputs, labels, **options)
