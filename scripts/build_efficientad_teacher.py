"""Build EfficientAD's packaged teacher: a PDN-S distilled from EfficientNet-Lite0 on offline images.

    nice -n 10 .venv/bin/python scripts/build_efficientad_teacher.py [--steps N] [--out PATH]

The paper (Batzner, Heckler & König, WACV 2024, appendix A.1, Algorithm 1) distils an ImageNet
WideResNet-101 into the PDN over 60k iterations of 16 ImageNet images; here (CPU, minutes):

- feature extractor: the packaged EfficientNet-Lite0 (``oodscope.backbones.EfficientNetLite``),
  stages 3 and 4 (strides 8 and 16) -- the analogue of the paper's WideResNet layer2 + layer3,
  which it takes with PatchCore's feature aggregation. As in the paper the extractor sees the crop at
  twice the PDN's resolution (512 vs 256 there, 128 vs 64 here), so stride 8 in the extractor is
  stride 4 in the PDN's frame: the PDN's own output stride. Stride 4 (stage 2, 24 channels) would be
  too shallow (edges and colours); strides 16-32 would leave a 33 px patch too little to predict.
- target: PatchCore's projection (Roth et al., CVPR 2022, official ``patchcore/common.py``): each
  layer's 3x3 neighbourhoods (``unfold``), adaptive-average-pooled to 1024 values, stage 4
  upsampled bilinearly to stage 3's grid, both concatenated and adaptive-average-pooled to 384
  channels; then normalised per channel by the mean and std over the first batches (Algorithm 1).
- images (all offline, real): scikit-image's sample photographs (astronaut, camera, cat, chelsea,
  clock, coffee, coins, colorwheel, hubble_deep_field, immunohistochemistry, logo, moon, page,
  retina, rocket, text, cell), scikit-learn's two sample photos (china, flower), the top halves of
  scikit-image's brick / grass / gravel textures and the even-numbered conformal-clip-data nominal
  textiles (the *training* side of oodscope's ``synthetic-ad`` benchmark, never its test side),
  and Fashion-MNIST sample images (upsampled). Crops of 128 px at a random scale, random grey with
  p = 0.1 (Algorithm 1).
- the PDN runs padded while distilled (its 64 px crop gives a 16 x 16 map = the target grid;
  anomalib's ``padding=True``); the detector runs it unpadded, as the paper does at inference.
- Adam, lr 1e-3 (the paper: 1e-4 over 60k steps), weight decay 1e-5, divided by 10 after 95 % of
  the steps; batch 8; seeded.

The file holds the teacher's weights in float16 (``teacher.*``), 32 penalty crops (``penalty``,
uint8 (32, 3, 128, 128), from the same images, random grey p = 0.3 as anomalib's penalty
transform: the paper's ImageNet penalty images) and the build's settings, time and held-out fit in
its metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from oodscope.detectors._efficientad import OUT_CHANNELS, TEACHER_FILE, PDNSmall, pixels_to_input  # noqa: E402

SKIMAGE_PHOTOS = ("astronaut", "camera", "cat", "chelsea", "clock", "coffee", "coins", "colorwheel",
                  "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket",
                  "text", "cell")
TEXTURES = ("brick", "grass", "gravel")
CROP = 128  # extractor side; the PDN sees CROP // 2
PATCH_DIM, TARGET_DIM = 1024, OUT_CHANNELS


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def offline_images(n_textiles: int = 120, n_fashion: int = 200) -> tuple[list[np.ndarray], list[str]]:
    """The real images the teacher is distilled on (uint8 RGB), and their names."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    images, names = [], []
    for name in SKIMAGE_PHOTOS:
        images.append(_rgb(getattr(data, name)()))
        names.append(f"skimage.{name}")
    for i, img in enumerate(load_sample_images().images):
        images.append(_rgb(img))
        names.append(f"sklearn.sample_images[{i}]")
    for name in TEXTURES:
        full = _rgb(getattr(data, name)())
        images.append(full[: full.shape[0] // 2])  # the benchmark's training half
        names.append(f"skimage.{name}[top half]")
    import conformal_clip_data

    folder = Path(conformal_clip_data.textile_simulated_root()) / "nominal"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[::2][:n_textiles]
    for p in files:
        images.append(_rgb(np.asarray(Image.open(p).convert("RGB"))))
    names.append(f"conformal-clip-data nominal textiles (even-numbered, {len(files)})")
    from oodscope.io.realdata import fashion_mnist_sample_root, read_idx

    fm = read_idx(Path(fashion_mnist_sample_root()) / "train-images-idx3-ubyte.gz")[:n_fashion]
    for img in fm:
        images.append(_rgb(np.asarray(Image.fromarray(img).resize((CROP, CROP), Image.BILINEAR))))
    names.append(f"Fashion-MNIST sample (first {len(fm)} train images, upsampled to {CROP} px)")
    return images, names


def random_crops(images: list[np.ndarray], n: int, rng: np.random.Generator, grey_p: float) -> torch.Tensor:
    """``n`` crops (n, 3, CROP, CROP) in [0, 1]: a random image, a random scale (the crop covers
    CROP..2*CROP source pixels when the image is large enough), a random position, random grey."""
    out = []
    for _ in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = int(rng.integers(CROP, max(CROP, min(h, w, 2 * CROP)) + 1)) if min(h, w) >= CROP else min(h, w)
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        t = torch.from_numpy(img[y:y + side, x:x + side]).permute(2, 0, 1).float()[None] / 255.0
        if side != CROP:
            t = F.interpolate(t, size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)
        if rng.random() < grey_p:
            t = (0.2989 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3]).repeat(1, 3, 1, 1)
        out.append(t)
    return torch.cat(out).clamp(0, 1)


def patchcore_projection(stage3: torch.Tensor, stage4: torch.Tensor) -> torch.Tensor:
    """PatchCore's locally aware features reduced to 384 channels (see the module docstring)."""
    def patch_features(m: torch.Tensor) -> torch.Tensor:
        n, c, h, w = m.shape
        u = F.unfold(m, kernel_size=3, padding=1)  # (n, c*9, h*w), channel-major as PatchCore's patchify
        u = u.transpose(1, 2).reshape(n * h * w, 1, c * 9)
        return F.adaptive_avg_pool1d(u, PATCH_DIM).reshape(n, h, w, PATCH_DIM)

    n, _, h, w = stage3.shape
    p3 = patch_features(stage3)
    p4 = patch_features(stage4).permute(0, 3, 1, 2)
    p4 = F.interpolate(p4, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    both = torch.stack([p3, p4], dim=3).reshape(n * h * w, 1, 2 * PATCH_DIM)
    return F.adaptive_avg_pool1d(both, TARGET_DIM).reshape(n, h, w, TARGET_DIM).permute(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "oodscope" / "data" / TEACHER_FILE)
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from oodscope.backbones.efficientnet import EfficientNetLite

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, sources = offline_images()
    extractor = EfficientNetLite(0, dense_layers=("stage3", "stage4"), image_size=CROP, resize="stretch",
                                 device="cpu")

    def targets(crops: torch.Tensor) -> torch.Tensor:
        f = extractor.encode_images(pixels_to_input(crops)).dense
        return patchcore_projection(torch.from_numpy(f["stage3"]).float(), torch.from_numpy(f["stage4"]).float())

    # Channel mean / std of the targets (Algorithm 1: over a sample of the training images).
    stats = torch.cat([targets(random_crops(images, 16, rng, 0.1)) for _ in range(8)])
    mean = stats.mean(dim=(0, 2, 3), keepdim=True)
    std = stats.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    held_out = random_crops(images, 32, np.random.default_rng(args.seed + 1), 0.0)
    held_targets = (targets(held_out) - mean) / std

    pdn = PDNSmall(OUT_CHANNELS, padding=True)
    opt = torch.optim.Adam(pdn.parameters(), lr=args.lr, weight_decay=1e-5)
    small = lambda crops: F.interpolate(crops, scale_factor=0.5, mode="bilinear", antialias=True)  # noqa: E731
    log = []
    for step in range(args.steps):
        if step == int(0.95 * args.steps):
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.1
        crops = random_crops(images, args.batch, rng, 0.1)
        with torch.no_grad():
            target = (targets(crops) - mean) / std
        loss = F.mse_loss(pdn(pixels_to_input(small(crops))), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            log.append((step, loss.item(), round(time.perf_counter() - started, 1)))
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:7.1f} s", flush=True)
    with torch.no_grad():
        held_mse = float(F.mse_loss(pdn(pixels_to_input(small(held_out))), held_targets))
    seconds = time.perf_counter() - started

    penalty = random_crops(images, 32, np.random.default_rng(args.seed + 2), 0.3)
    tensors = {f"teacher.{k}": v.detach().half().contiguous() for k, v in pdn.state_dict().items()}
    tensors["penalty"] = (penalty * 255).round().to(torch.uint8).contiguous()
    meta = {
        "method": "EfficientAD teacher (PDN-S) distilled from EfficientNet-Lite0 stage3+stage4, PatchCore projection",
        "seed": str(args.seed), "steps": str(args.steps), "batch": str(args.batch), "lr": str(args.lr),
        "crop": f"{CROP} px extractor / {CROP // 2} px PDN",
        "held_out_mse": f"{held_mse:.4f}", "held_out_r2": f"{1 - held_mse:.4f}",
        "build_seconds": f"{seconds:.1f}", "cpu_count": str(os.cpu_count()),
        "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "torch": torch.__version__, "sources": json.dumps(sources), "log": json.dumps(log),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {seconds:.0f} s; held-out MSE on "
          f"normalised targets {held_mse:.4f} (R^2 {1 - held_mse:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
