"""EfficientAD's networks, losses and training loop (used by :mod:`oodscope.detectors.efficientad`).

Batzner, Heckler & König, "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level
Latencies", WACV 2024 (arXiv:2303.14535), Sec. 3 and the pseudo-code of appendix A.1; ported from
the paper and anomalib's ``models/image/efficient_ad/torch_model.py`` / ``lightning_model.py``.

Every network takes images as Lite0 normalises them, ``x = (p - 0.5) / 0.5`` for pixels ``p`` in
[0, 1] (the teacher is distilled from EfficientNet-Lite0, which expects that; anomalib normalises with
ImageNet's mean/std for its WideResNet-distilled teacher).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

#: Channels of the teacher's output (the paper's PDN: 384).
OUT_CHANNELS = 384
#: Cells the unpadded PDN loses on each side of its map (its 33 px receptive field at stride 4):
#: anomalib pads the maps by 4 cells so that the grid is image_size / 4 (``pad_maps``).
MAP_PAD = 4
#: The packaged teacher (``scripts/build_efficientad_teacher.py``).
TEACHER_FILE = "efficientad_teacher_lite0.safetensors"


def pixels_to_input(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> the networks' input (EfficientNet-Lite's normalisation, mean 0.5, std 0.5)."""
    return (pixels - 0.5) / 0.5


class PDNSmall(nn.Module):
    """The paper's small patch description network PDN-S (Table 6 / Fig. 2): four convolutions
    (4x4 128, 4x4 256, 3x3 256, 4x4 ``out_channels``) with ReLU after the first three and 2x2 average
    pooling (stride 2) after the first two: receptive field 33 px, output stride 4.

    ``padding=False`` (the paper's default at inference): a 256 px input gives a 56 x 56 map; with
    ``padding=True`` (how the teacher is distilled, anomalib's option) it gives 64 x 64."""

    def __init__(self, out_channels: int = OUT_CHANNELS, padding: bool = False) -> None:
        super().__init__()
        self.padding = padding
        self.conv1 = nn.Conv2d(3, 128, kernel_size=4)
        self.conv2 = nn.Conv2d(128, 256, kernel_size=4)
        self.conv3 = nn.Conv2d(256, 256, kernel_size=3)
        self.conv4 = nn.Conv2d(256, out_channels, kernel_size=4)

    def forward(self, x: torch.Tensor, padding: bool | None = None) -> torch.Tensor:
        # The padding is an option of the forward pass, not of the weights: the same teacher runs
        # padded while distilled (its map then matches the target grid) and unpadded afterwards.
        pad = self.padding if padding is None else padding
        p = 1 if pad else 0
        x = F.relu(F.conv2d(x, self.conv1.weight, self.conv1.bias, padding=3 * p))
        x = F.avg_pool2d(x, 2, 2, padding=p)
        x = F.relu(F.conv2d(x, self.conv2.weight, self.conv2.bias, padding=3 * p))
        x = F.avg_pool2d(x, 2, 2, padding=p)
        x = F.relu(F.conv2d(x, self.conv3.weight, self.conv3.bias, padding=p))
        return self.conv4(x)


class AutoEncoder(nn.Module):
    """The paper's autoencoder (Table 7): six strided 4x4 convolutions down to a 64-channel code
    (the last an 8x8 one without ReLU), then seven bilinear-upsample + convolution stages (six 4x4,
    one 3x3) and a 3x3 output convolution back to the teacher's (unpadded) map size, dropout 0.2
    after the first six; ``image_size`` fixes the
    upsampling sizes (anomalib's ``Decoder``). The last encoder convolution has kernel
    ``image_size / 32`` (8 at the paper's 256 px), so the code is 1 x 1 x 64 at every size (at 128 px
    an 8x8 kernel would not fit the 4 x 4 map); ``image_size`` must be a multiple of 32, >= 64 (the
    first upsampling goes to at least 1 x 1)."""

    def __init__(self, image_size: int, out_channels: int = OUT_CHANNELS) -> None:
        super().__init__()
        if image_size < 64 or image_size % 32:
            raise ValueError(f"the autoencoder needs image_size a multiple of 32 and >= 64, got {image_size}")
        self.image_size = image_size
        self.enc = nn.ModuleList([
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.Conv2d(32, 32, 4, stride=2, padding=1),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.Conv2d(64, 64, 4, stride=2, padding=1),
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.Conv2d(64, 64, image_size // 32),
        ])
        self.dec = nn.ModuleList([*(nn.Conv2d(64, 64, 4, padding=2) for _ in range(6)),
                                  nn.Conv2d(64, 64, 3, padding=1)])
        self.last = nn.Conv2d(64, out_channels, 3, padding=1)
        self.dropout = nn.Dropout(0.2)

    def decoder_sizes(self) -> list[int]:
        """The side after each upsampling (anomalib: s/64 - 1, s/32, s/16 - 1, s/8, s/4 - 1, s/2 - 1,
        then the unpadded PDN map side s/4 - 8; the first at least 1 for s = 64)."""
        s = self.image_size
        return [max(1, s // 64 - 1), s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1, s // 4 - 2 * MAP_PAD]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.enc):
            x = conv(x)
            if i < len(self.enc) - 1:
                x = F.relu(x)
        for i, (conv, side) in enumerate(zip(self.dec, self.decoder_sizes(), strict=True)):
            x = F.interpolate(x, size=(side, side), mode="bilinear")
            x = F.relu(conv(x))
            if i < 6:
                x = self.dropout(x)
        return self.last(x)


def receptive_field(net: PDNSmall) -> int:
    """The side of the input region one output cell of ``net`` (unpadded) depends on, by the usual
    recursion r <- r + (k - 1) * jump, jump <- jump * stride over its layers."""
    r, jump = 1, 1
    for k, stride in ((4, 1), (2, 2), (4, 1), (2, 2), (3, 1), (4, 1)):
        r += (k - 1) * jump
        jump *= stride
    return r


# ----------------------------------------------------------------------------------- losses, maps
def hard_loss(distance: torch.Tensor, q_hard: float = 0.999, max_elements: int = 2**24,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's hard-feature loss (eq. 1): the mean of the squared differences at or above their
    ``q_hard`` quantile (so only the hardest 0.1 % of the elements train the student).

    ``torch.quantile`` takes at most 2**24 elements; beyond that a seeded random subset of that many
    sets the threshold (anomalib's ``reduce_tensor_elems``); the mean is over all elements above it."""
    flat = distance.reshape(-1)
    sample = flat
    if flat.numel() > max_elements:
        pick = torch.randperm(flat.numel(), generator=generator, device=flat.device)[:max_elements]
        sample = flat[pick]
    d_hard = torch.quantile(sample.detach(), q_hard)
    return flat[flat >= d_hard].mean()


def quantile_normalize(amap: torch.Tensor, qa: float, qb: float) -> torch.Tensor:
    """The paper's map normalisation (Sec. 3.4): ``0.1 * (M - q_a) / (q_b - q_a)``, so that the
    ``q_a`` quantile of normal maps goes to 0 and the ``q_b`` quantile to 0.1."""
    return 0.1 * (amap - qa) / (qb - qa)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The paper's AE augmentation: one of brightness, contrast, saturation (torchvision's
    ``adjust_*`` semantics, on [0, 1] pixels), with a factor drawn from U(0.8, 1.2)."""
    choice = int(torch.randint(3, (1,), generator=generator))
    factor = float(0.8 + 0.4 * torch.rand((), generator=generator))
    gray = (0.2989 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2])[:, None]
    if choice == 0:  # brightness: blend with black
        other = torch.zeros_like(pixels)
    elif choice == 1:  # contrast: blend with the mean grey level of each image
        other = gray.mean(dim=(1, 2, 3), keepdim=True).expand_as(pixels)
    else:  # saturation: blend with the grey image
        other = gray.expand_as(pixels)
    return (factor * pixels + (1.0 - factor) * other).clamp(0.0, 1.0)


def pad_map(amap: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (N, h + 8, w + 8): anomalib's ``pad_maps`` (zeros), so the unpadded PDN's map covers
    the image on the same image_size / 4 grid as the padded one."""
    return F.pad(amap, (MAP_PAD,) * 4)


# ----------------------------------------------------------------------------------- teacher
@dataclass
class Teacher:
    """The packaged teacher: a PDN-S distilled from EfficientNet-Lite0 and the penalty crops."""

    network: PDNSmall
    penalty: torch.Tensor  # (P, 3, s, s) uint8 crops of offline images, the paper's ImageNet penalty set
    sha256: str
    meta: dict


def load_teacher(path: str | None = None) -> Teacher:
    """The teacher from ``path`` (default: the packaged file), float32, eval mode, no gradients."""
    from safetensors import safe_open

    if path is None:
        ref = resources.files("oodscope.data") / TEACHER_FILE
        with resources.as_file(ref) as p:
            return load_teacher(str(p))
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()[:16]
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the RNG alone
        net = PDNSmall(OUT_CHANNELS)
    net.load_state_dict({k[len("teacher."):]: v.float() for k, v in tensors.items() if k.startswith("teacher.")})
    net.eval().requires_grad_(False)
    return Teacher(net, tensors["penalty"], digest, meta)


def train_steps_lr(step: int, steps: int, lr: float) -> float:
    """The paper's schedule: ``lr``, divided by 10 after 95 % of the steps."""
    return lr * (0.1 if step >= math.floor(0.95 * steps) else 1.0)
