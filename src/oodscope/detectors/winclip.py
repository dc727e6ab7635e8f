"""WinCLIP / WinCLIP+ — zero- and few-shot anomaly maps from CLIP windows and state prompts.

Jeong, Zou, Kim, Zhang, Ravichandran & Dabeer, "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023. There is no official code; the reference implementation is anomalib's
``WinClip`` (``src/anomalib/models/image/winclip/torch_model.py``, ``utils.py``, ``prompting.py``),
which this file ports to cached dense features.

Formula: ``a(x) = softmax_c(cos(f(x), t_c) / T)[anomalous]`` for the image and every window,
window scores -> patches by the harmonic mean of the windows covering them, scales combined by a
harmonic mean; WinCLIP+ adds ``min_ref (1 - cos(f, f_ref)) / 2`` per patch and window, averaged.

- Compositional prompt ensemble (``prompts="winclip"``): 7 normal states ("{}", "flawless {}",
  "perfect {}", "unblemished {}", "{} without flaw/defect/damage") and 4 anomalous ones ("damaged
  {}", "{} with flaw/defect/damage") of ``object_name``, each in anomalib's 21 templates ("a cropped
  photo of the {}.", ...); the text embedding of a state class is the mean of its prompts'.
  ``prompts="filo"``: FiLo-style fine-grained anomaly descriptions (Gu et al., ACM MM 2024: anomaly
  types named, "{} with a crack", "{} with a scratch", ...) in the same templates; a generic list,
  not FiLo's per-category LLM-written one.
- Zero-shot (``k_shot=0``): class score with temperature ``T=0.07`` (anomalib, from CLIP) for the
  global image embedding (``Features.embedding``: the image score) and for every window of
  ``scales=(2, 3)`` patches (anomalib's default; stride 1). Per scale, each patch gets the harmonic
  mean of the scores of the windows covering it; the map is the harmonic mean of the image-score
  map and the per-scale maps (anomalib ``_compute_zero_shot_scores``).
- Few-shot WinCLIP+ (``k_shot=k``): ``fit`` keeps the patch and window embeddings of k normal
  reference images (drawn with ``seed`` from the features given to fit). The few-shot map is the
  mean over {patches, each scale} of the visual association score ``min (1 - cos) / 2`` to all
  reference embeddings of that scale (windows harmonically aggregated to patches); the final map is
  the mean of the zero- and few-shot maps and the image score the mean of the zero-shot image score
  and the few-shot map's maximum (anomalib ``forward``).

Works on the joint image-text patch embeddings of any backbone as a grid (``layer``; default: the
first of ``value_path`` (HF CLIP / SigLIP dense value-path features), ``conse`` (the packaged ConSE
backbone's cell embeddings, offline), ``tokens`` that the features have, else the only or last dense
layer); its channel dimension must equal the text embedding's. Needs a text encoder in the same
space (``fit(text_encoder=backbone)``; ``fit_needs().text_encoder``).

Departures from anomalib: a window embedding is the mean of its patches' embeddings (anomalib
re-runs the ViT on the window's tokens, which cached features cannot), so windows only smooth the
patch embeddings; prompt embeddings are L2-normalised before averaging (oodscope's text cache
stores unit embeddings); maps are at the patch grid and the pipeline upsamples them (anomalib
upsamples bilinearly without smoothing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oodscope.detectors._anomaly import AnomalyDetector
from oodscope.detectors.base import DetectorError, register
from oodscope.detectors.kinds import FitNeeds
from oodscope.text.prompts import encode_texts

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
#: FiLo-style fine-grained anomaly descriptions (generic anomaly types, see the module docstring).
FILO_ANOMALOUS_STATES = ("{} with a crack", "{} with a scratch", "{} with a hole", "{} with a stain",
                         "{} with contamination", "{} with a cut", "{} with a missing part", "broken {}",
                         "{} with a color defect", "bent {}", "{} with a fold", "{} with a thread defect")
#: anomalib's template list (``prompting.py``; the jpeg template appears twice there, kept as it is).
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.",
    "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)
PROMPT_SETS = ("winclip", "filo")
PREFERRED_LAYERS = ("value_path", "conse", "tokens")


def prompt_ensemble(object_name: str, prompts: str = "winclip") -> tuple[list[str], list[str]]:
    """The (normal, anomalous) prompt lists: every state of ``object_name`` in every template."""
    anomalous_states = ANOMALOUS_STATES if prompts == "winclip" else FILO_ANOMALOUS_STATES
    normal = [t.format(s.format(object_name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(object_name)) for s in anomalous_states for t in TEMPLATES]
    return normal, anomalous


def window_masks(h: int, w: int, scale: int) -> torch.Tensor:
    """(n_windows, h*w) 0/1 incidence of the stride-1 ``scale`` x ``scale`` windows over the grid."""
    if scale > h or scale > w:
        raise DetectorError(f"winclip: a {scale}x{scale} window does not fit the {h}x{w} patch grid")
    grid = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    cells = F.unfold(grid, kernel_size=scale).long()[0]  # (scale*scale, n_windows)
    masks = torch.zeros(cells.shape[1], h * w)
    masks.scatter_(1, cells.T, 1.0)
    return masks


def window_embeddings(patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N, P, D) patch embeddings -> (N, n_windows, D): the mean of each window's patches."""
    return torch.einsum("wp,npd->nwd", masks / masks.sum(dim=1, keepdim=True), patches)


def harmonic_aggregation(window_scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N, n_windows) -> (N, P): each patch's harmonic mean of the windows covering it (0 if none)."""
    count = masks.sum(dim=0)
    inv = (1.0 / window_scores) @ masks
    return torch.nan_to_num(count / inv, nan=0.0, posinf=0.0)


def class_scores(x: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probability of the anomalous class (row 1 of ``text``) by a softmax of cosines / temperature."""
    cos = F.normalize(x, dim=-1) @ F.normalize(text, dim=-1).T
    return torch.softmax(cos / temperature, dim=-1)[..., 1]


def association(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(N, M, D) vs (R, D) -> (N, M): ``min_ref (1 - cos) / 2`` (anomalib ``visual_association_score``)."""
    cos = F.normalize(x, dim=-1) @ F.normalize(reference, dim=-1).T
    return (1.0 - cos).amin(dim=-1) / 2.0


@register
class WinCLIP(AnomalyDetector):
    name = "winclip"
    needs_fit = True

    def __init__(
        self,
        object_name: str = "object",
        k_shot: int = 0,
        scales: tuple[int, ...] | list[int] = (2, 3),
        temperature: float = 0.07,
        prompts: str = "winclip",
        layer: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.object_name = object_name
        self.k_shot = k_shot
        self.scales = list(scales)  # a list: parameters round-trip through JSON unchanged
        self.temperature = temperature
        self.prompts = prompts
        self.layer = layer
        self.seed = seed
        if not isinstance(object_name, str) or not object_name.strip():
            raise DetectorError(f"{self.name}: object_name must be a non-empty string (e.g. 'fabric')")
        if not (isinstance(k_shot, int) and k_shot >= 0):
            raise DetectorError(f"{self.name}: k_shot must be a non-negative integer, got {k_shot!r}")
        if not self.scales or any(not (isinstance(s, int) and s >= 1) for s in self.scales):
            raise DetectorError(f"{self.name}: scales must be positive integers, got {scales!r}")
        if not float(temperature) > 0:
            raise DetectorError(f"{self.name}: temperature must be > 0, got {temperature}")
        if prompts not in PROMPT_SETS:
            raise DetectorError(f"{self.name}: prompts must be one of {list(PROMPT_SETS)}, got {prompts!r}")

    # ------------------------------------------------------------------ needs
    @classmethod
    def class_fit_needs(cls) -> FitNeeds:
        return FitNeeds(text_encoder=True)  # zero-shot by default: the prompts, no normal image

    def fit_needs(self) -> FitNeeds:
        return FitNeeds(text_encoder=True, features=self.k_shot > 0)

    def fields(self) -> tuple[str, ...]:
        return ("dense", "embedding")

    # ------------------------------------------------------------------ fit
    def _layer(self, dense: dict) -> str:
        if self.layer is not None:
            if self.layer not in dense:
                raise DetectorError(f"{self.name}: dense layer {self.layer!r} not in the features ({sorted(dense)})")
            return self.layer
        for name in PREFERRED_LAYERS:
            if name in dense:
                return name
        if not dense:
            raise DetectorError(f"{self.name}: the features have no dense maps (ask the backbone for dense_layers)")
        return sorted(dense)[-1]

    def _patches(self, inputs: dict) -> torch.Tensor:
        name = self.fit_info_.get("layer") or self._layer(inputs["dense"])
        if name not in inputs["dense"]:
            raise DetectorError(f"{self.name}: fitted on dense layer {name!r}, not in the features")
        m = inputs["dense"][name].float()
        if m.ndim != 4 or not torch.isfinite(m).all():
            raise DetectorError(f"{self.name}: dense layer {name!r} must be finite (N, D, h, w) maps")
        return m

    def _fit_from(self, inputs: Any, labels: Any, *, text_encoder: Any = None, cache: Any = None,
                  **_: Any) -> None:
        normal, anomalous = prompt_ensemble(self.object_name, self.prompts)
        text = np.stack([encode_texts(text_encoder, normal, cache=cache).mean(axis=0),
                         encode_texts(text_encoder, anomalous, cache=cache).mean(axis=0)])
        self.state_["text"] = torch.from_numpy(text.astype(np.float32))
        if inputs is not None:
            self.fit_info_["layer"] = self._layer(inputs["dense"])
        if self.k_shot == 0:
            return
        m = self._patches(inputs)
        if len(m) < self.k_shot:
            raise DetectorError(f"{self.name}: k_shot={self.k_shot} reference images but the fit features have "
                                f"{len(m)}")
        rows = np.sort(np.random.default_rng(self.seed).choice(len(m), size=self.k_shot, replace=False))
        self.fit_info_["reference_rows"] = rows.tolist()
        ref = m[torch.from_numpy(rows)]
        n, d, h, w = ref.shape
        self.fit_info_["grid"] = [h, w]
        patches = ref.flatten(2).transpose(1, 2)  # (k, P, D)
        self.state_["ref_patches"] = patches.reshape(-1, d).contiguous()
        for s in self.scales:
            self.state_[f"ref_windows_{s}"] = window_embeddings(patches, window_masks(h, w, s)).reshape(-1, d)

    # ------------------------------------------------------------------ score
    def _score_maps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._patches(inputs)
        n, d, h, w = m.shape
        text = self.state_["text"].float()
        if d != text.shape[1] or inputs["embedding"].shape[1] != text.shape[1]:
            raise DetectorError(f"{self.name}: patch embeddings are {d}-d and image embeddings "
                                f"{inputs['embedding'].shape[1]}-d but the text embeddings {text.shape[1]}-d: "
                                "give joint image-text features (layer='value_path' of a CLIP, 'conse')")
        if self.k_shot and [h, w] != list(self.fit_info_["grid"]):
            raise DetectorError(f"{self.name}: reference grid {self.fit_info_['grid']}, got {[h, w]}")
        patches = m.flatten(2).transpose(1, 2)  # (N, P, D)
        image = class_scores(inputs["embedding"].float(), text, self.temperature)  # (N,)
        zero = [image[:, None].expand(n, h * w)]
        few = [association(patches, self.state_["ref_patches"])] if self.k_shot else []
        for s in self.scales:
            masks = window_masks(h, w, s)
            windows = window_embeddings(patches, masks)
            zero.append(harmonic_aggregation(class_scores(windows, text, self.temperature), masks))
            if self.k_shot:
                few.append(harmonic_aggregation(association(windows, self.state_[f"ref_windows_{s}"]), masks))
        zero_map = len(zero) / (1.0 / torch.stack(zero)).sum(dim=0)  # harmonic mean over scales
        if not self.k_shot:
            return image.double(), zero_map.reshape(n, h, w)
        few_map = torch.stack(few).mean(dim=0)
        scores = (image + few_map.amax(dim=1)) / 2.0
        return scores.double(), ((zero_map + few_map) / 2.0).reshape(n, h, w)
