"""CLIP and SigLIP through Hugging Face ``transformers`` (hub id or local directory; no torchvision).

Preprocessing is done by oodscope (Pillow/NumPy) from the model's ``preprocessor_config.json``:
CLIP resizes the shorter side and centre-crops; SigLIP resizes to a square. Image embeddings are
L2-normalized in the joint space.

``patches`` (the option ``patches=True`` / ``"dense"`` / ``"tokens"``) adds one local feature per
image patch (without CLS), left unnormalized:

- ``"dense"`` (the default when patches are asked for; GL-MCM's official local features): the last
  vision block is run again with its self-attention replaced by the value path, i.e. for the input
  ``x`` of the last block ``v = x + out_proj(v_proj(ln_1(x)))``, ``v = v + mlp(ln_2(v))``, then the
  final layer norm and the visual projection. This is what AtsuMiyai/GL-MCM ``clip/model.py``
  (``ResidualAttentionBlock.forward`` / ``VisionTransformer.forward``) computes, as MaskCLIP does;
  the patches then live in the joint image-text space. The official code's ResNet variant
  (``c_proj(v_proj(x))`` in the attention pool) has no counterpart here: transformers' CLIP is
  ViT-only. For SigLIP the same value path is applied to its last encoder layer, followed by its
  final layer norm (SigLIP has no projection); no official GL-MCM code exists for SigLIP.
- ``"tokens"`` (what oodscope computed before): the ordinary last-layer patch tokens after the final layer
  norm and the visual projection (SigLIP: the last hidden state). Recorded in the backbone id
  (``hf:<model>?patches=tokens``) so caches, saved models and reports never mix the two.

``dense_layers`` (image anomaly detection) gives the same local features as (N, D, g, g) grids in
``Features.dense`` (g = image size / patch size; row-major patch order), float16: ``"value_path"``
(the default for ``True``: the dense value-path features above, which localise), ``"tokens"`` (the
ordinary last-layer tokens above), and ``"block<k>"`` (the hidden states after encoder layer k,
1-based, before any final norm or projection, for methods that read intermediate ViT layers). With
dense maps the default preprocessing is ``resize="stretch"`` (a map then covers the whole image
instead of CLIP's centre crop); ``resize=`` chooses another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from oodscope.backbones.base import Features, InputSpec, ResizePolicy
from oodscope.backbones.dense import dense_option, to_dense_array, tokens_to_grid

# Pixel statistics used by OpenAI CLIP when a model folder has no preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SUPPORTED = ("clip", "siglip", "siglip2")
PATCH_KINDS = ("dense", "tokens")
#: Default ``dense_layers``: the value-path local features (MaskCLIP / GL-MCM), which localise.
DEFAULT_DENSE = ("value_path",)


def patch_kind(patches: bool | str | None) -> str | None:
    """``patches`` option -> ``"dense"``, ``"tokens"`` or ``None`` (no patches); ``True`` means dense."""
    if patches is None or patches is False:
        return None
    if patches is True:
        return "dense"
    if patches in PATCH_KINDS:
        return str(patches)
    raise ValueError(f"patches must be True, False, 'dense' or 'tokens', got {patches!r}")


class HFVisionLanguage:
    """A transformers CLIP/SigLIP model as an oodscope vision-language backbone."""

    def __init__(
        self,
        name_or_path: str,
        *,
        device: str | None = None,
        patches: bool | str = False,
        local_files_only: bool | None = None,
        half_on_cuda: bool = True,
        dense_layers: bool | str | tuple[str, ...] | list[str] | None = None,
        resize: ResizePolicy | None = None,
    ) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError as exc:  # pragma: no cover - environment dependent
            raise ImportError("hf: backbones need transformers (pip install oodscope[hf])") from exc
        self.name_or_path = name_or_path
        self.is_local = Path(name_or_path).is_dir()
        self.local_files_only = self.is_local if local_files_only is None else local_files_only
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.patch_kind = patch_kind(patches)
        self.want_patches = self.patch_kind is not None
        self.half_on_cuda = half_on_cuda
        self.id = f"hf:{Path(name_or_path).resolve() if self.is_local else name_or_path}"
        if self.patch_kind == "tokens":  # the old local features: never confused with the dense ones
            self.id += "?patches=tokens"
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(name_or_path, local_files_only=self.local_files_only)
        if self.config.model_type not in SUPPORTED:
            raise ValueError(f"{name_or_path}: model type {self.config.model_type!r} is not one of {SUPPORTED}")
        self.kind = "clip" if self.config.model_type == "clip" else "siglip"
        depth = int(self.config.vision_config.num_hidden_layers)
        valid = ("value_path", "tokens", *(f"block{k}" for k in range(1, depth + 1)))
        self.dense_layers = dense_option(dense_layers, DEFAULT_DENSE, valid, who=self.id)
        self.input_spec = self._input_spec()
        if resize is None and self.dense_layers:
            resize = "stretch"
        if resize is not None and resize != self.input_spec.resize:
            self.input_spec = dataclasses.replace(self.input_spec, resize=resize, crop_fraction=1.0)

    def _input_spec(self) -> InputSpec:
        size = int(self.config.vision_config.image_size)
        pre = self._preprocessor_config()
        if self.kind == "clip":
            mean, std = tuple(pre.get("image_mean", CLIP_MEAN)), tuple(pre.get("image_std", CLIP_STD))
            crop = pre.get("crop_size", size)
            crop = crop.get("height", size) if isinstance(crop, dict) else int(crop)
            shortest = pre.get("size", {"shortest_edge": crop})
            shortest = shortest.get("shortest_edge", crop) if isinstance(shortest, dict) else int(shortest)
            return InputSpec(size=crop, mean=mean, std=std, resize="shorter_center_crop",
                             crop_fraction=crop / shortest, interpolation="bicubic")
        mean, std = tuple(pre.get("image_mean", (0.5,) * 3)), tuple(pre.get("image_std", (0.5,) * 3))
        return InputSpec(size=size, mean=mean, std=std, resize="stretch", interpolation="bicubic")

    def _preprocessor_config(self) -> dict:
        try:
            from huggingface_hub import hf_hub_download

            path = (Path(self.name_or_path) / "preprocessor_config.json" if self.is_local
                    else Path(hf_hub_download(self.name_or_path, "preprocessor_config.json",
                                              local_files_only=self.local_files_only)))
            return json.loads(path.read_text()) if path.is_file() else {}
        except Exception:  # noqa: BLE001 - a model without the file uses the defaults above
            return {}

    @cached_property
    def model(self):
        from transformers import AutoModel

        model = AutoModel.from_pretrained(self.name_or_path, local_files_only=self.local_files_only)
        return model.eval().requires_grad_(False).to(self.device)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.name_or_path, local_files_only=self.local_files_only)

    @cached_property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def weights_fingerprint(self) -> str:
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True, default=str).encode())
        for p in list(self.model.parameters())[:4] + list(self.model.parameters())[-4:]:
            digest.update(p.detach().float().cpu().numpy().tobytes()[:4096])
        return digest.hexdigest()[:16]

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor) -> Features:
        x = batch.to(self.device).contiguous()
        use_half = self.half_on_cuda and x.is_cuda
        dense = self.want_patches and self.patch_kind == "dense"
        wanted = set(self.dense_layers)
        need_value = dense or "value_path" in wanted
        blocks = [int(n[len("block"):]) for n in self.dense_layers if n.startswith("block")]
        maps: dict[str, torch.Tensor] = {}
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_half):
            vision = self.model.vision_model
            captured: dict[str, torch.Tensor] = {}
            hook = None
            if need_value:  # the input of the last block, for the value path
                def keep_input(_module, args, kwargs):
                    captured["x"] = args[0] if args else kwargs["hidden_states"]

                hook = vision.encoder.layers[-1].register_forward_pre_hook(keep_input, with_kwargs=True)
            try:
                out = vision(pixel_values=x, output_hidden_states=bool(blocks))
            finally:
                if hook is not None:
                    hook.remove()
            first = 1 if self.kind == "clip" else 0  # CLIP's CLS token is not a patch
            if self.kind == "clip":
                embedding = self.model.visual_projection(out.pooler_output)
                project = lambda t: self.model.visual_projection(vision.post_layernorm(t))  # noqa: E731
                tokens = project(out.last_hidden_state[:, 1:, :]) if self.want_patches or "tokens" in wanted \
                    else None
            else:  # SigLIP: no CLS token and no projection; tokens are already layer-normed
                embedding = out.pooler_output
                project = vision.post_layernorm
                tokens = out.last_hidden_state
            values = project(value_path(vision.encoder.layers[-1], captured["x"])[:, first:, :]) if need_value \
                else None
            patches = (values if dense else tokens) if self.want_patches else None
            if "tokens" in wanted:
                maps["tokens"] = tokens
            if "value_path" in wanted:
                maps["value_path"] = values
            for k in blocks:  # hidden_states[0] is the patch embedding, [k] the output of layer k
                maps[f"block{k}"] = out.hidden_states[k][:, first:, :]
        embedding = torch.nn.functional.normalize(embedding.float(), dim=-1)
        return Features(
            embedding=embedding.cpu().numpy(),
            patches=None if patches is None else patches.float().cpu().numpy(),
            dense={name: to_dense_array(tokens_to_grid(maps[name].float())) for name in self.dense_layers},
            logit_scale=self.logit_scale,
            backbone_id=self.id,
        )

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings")
        padding = "max_length" if self.kind == "siglip" else True  # SigLIP was trained on padded text
        max_length = int(self.config.text_config.max_position_embeddings)
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size]), padding=padding, truncation=True,
                                    max_length=max_length, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            if self.kind == "siglip":
                tokens.pop("attention_mask", None)  # SigLIP's text tower attends to padding by design
            text_out = self.model.text_model(**tokens)
            pooled = text_out.pooler_output
            if self.kind == "clip":
                pooled = self.model.text_projection(pooled)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.projection_dim), np.float32)


def value_path(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A transformer encoder layer with self-attention replaced by its value path (MaskCLIP / GL-MCM):
    ``v = x + out_proj(v_proj(ln_1(x)))``, then ``v + mlp(ln_2(v))``."""
    attn = layer.self_attn
    v = x + attn.out_proj(attn.v_proj(layer.layer_norm1(x)))
    return v + layer.mlp(layer.layer_norm2(v))
