"""Backbones on an exported graph: the same network run by ONNX Runtime or OpenVINO instead of eager PyTorch.

:func:`export_network` writes a backbone's *network* (for a derived backbone such as ConSE, the
classifier it is computed from: :func:`~oodscope.backbones.base.derived_from`) as one graph with
every per-image output the detectors read — ``logits``, ``penultimate`` (= the classifier's
``embedding``), ``patches`` and ``layers`` when the backbone produces them — plus ``head.safetensors``
(the final linear layer) and ``manifest.json``: backbone id and weights fingerprint, input spec,
outputs, runtime, precision, file hashes and a check of the graph against eager PyTorch.
Detectors, conversions (ConSE) and calibration stay in oodscope.

:class:`ExportedBackbone` reads such a directory and implements the backbone protocol (``id``,
``input_spec``, ``device``, ``encode_images``, ``weights_fingerprint``). Its ``id`` is the network's
own (a saved model's identity check and the detector's backbone check hold); its
``weights_fingerprint()`` is a hash of the network's fingerprint, the runtime, the precision and the
graph file, so the feature cache never mixes rows computed by different runtimes: FP32 ONNX Runtime
and OpenVINO outputs differ from eager PyTorch by up to ~1e-5 (convolution algorithms differ), INT8
ones by far more.

INT8 is post-training static quantisation with ``onnxruntime.quantization.quantize_static`` (QDQ
format, per-channel signed 8-bit weights, unsigned 8-bit activations, min-max ranges) calibrated on
ID images; the final linear layer and the convolution reading the image stay FP32. OpenVINO runs
the same quantised graph as INT8 (its QuantizeLinear / DequantizeLinear pairs become OpenVINO's
low-precision operations), so both runtimes make the same approximation. The precision is recorded
in the manifest and shown by :func:`describe_export`; nothing is quantised unless asked.

The runtimes are optional: ``pip install 'oodscope[export]'`` (onnx, onnxruntime, openvino).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oodscope.backbones.base import RUNTIMES, Features, InputSpec, derived_from

#: What ``runtime=`` accepts everywhere ("torch" = the eager PyTorch backbone, unchanged).
#: ``oodscope export --format`` -> the runtime that runs it.
FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}
PRECISIONS = ("fp32", "int8")
MANIFEST = "manifest.json"
#: Where a saved model directory carries its exports: ``MODEL_DIR/export/<runtime>/``.
MODEL_EXPORT_DIR = "export"
HEAD_FILE = "head.safetensors"
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"
EXPORT_FORMAT = "oodscope-export"
EXPORT_VERSION = 1
OPSET = 17
INPUT_NAME = "images"
#: An FP32 export whose outputs differ from eager PyTorch by more than this (relative to the output's
#: largest magnitude, at least 1) on the check batch is refused: the graph does not compute the network.
FP32_TOLERANCE = 1e-3
#: Calibration images used for INT8 when the caller does not say.
DEFAULT_CALIBRATION_IMAGES = 256

_PACKAGES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "openvino": "openvino"}


class ExportError(ValueError):
    """An export cannot be made, read, or used for this backbone / model (a clear message says why)."""


def require(package: str):
    """Import one of the optional runtime packages, or raise ImportError saying how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"{package} is not installed: pip install 'oodscope[export]' (onnx, onnxruntime, openvino), "
            f"or pip install {_PACKAGES.get(package, package)}"
        ) from exc


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ExportError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    return runtime


def runtime_of_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ the graph
def network_outputs(network: Any) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]], list[str],
                                           torch.nn.Module | None]:
    """The traceable forward of ``network`` giving every per-image output, its layer names and its module.

    Supported: EfficientNet-Lite (``effnet-lite*``), :class:`~oodscope.backbones.TorchClassifier`,
    and any object with ``export_outputs(x) -> {"logits": ..., "penultimate": ..., ...}``,
    ``export_layer_names`` and ``export_module`` (the ``nn.Module`` holding the weights). Outputs
    follow ``encode_images``: patches are (N, cells, D), layers pooled.
    """
    from oodscope.backbones.efficientnet import EfficientNetLite
    from oodscope.backbones.torch_classifier import TorchClassifier

    if isinstance(network, EfficientNetLite):
        network.model  # noqa: B018 - weights load here (fused batch norms, as encode_images runs them)
        names = [f"block{i}" for i in network._stage_ends] if network.want_layers else []

        def effnet(x: torch.Tensor) -> dict[str, torch.Tensor]:
            layer_out: dict[str, torch.Tensor] | None = {} if network.want_layers else None
            fmap = network._feature_map(x, layer_out)
            pooled = fmap.mean(dim=(2, 3))
            out = {"logits": network.model._fc(pooled), "penultimate": pooled}
            if network.want_patches:
                out["patches"] = fmap.flatten(2).transpose(1, 2)
            out.update({f"layer:{k}": v for k, v in (layer_out or {}).items()})
            return out

        return effnet, names, network.model
    if isinstance(network, TorchClassifier):
        def classifier(x: torch.Tensor) -> dict[str, torch.Tensor]:
            logits, captured = network._run(x)
            out = {"logits": logits, "penultimate": captured["penultimate"].flatten(1)}
            if network.want_patches:
                out["patches"] = captured["feature_map"].flatten(2).transpose(1, 2)
            for name in network.layer_names:
                value = captured[f"layer:{name}"]
                out[f"layer:{name}"] = value.mean(dim=(2, 3)) if value.ndim == 4 else value.flatten(1)
            return out

        return classifier, list(network.layer_names), network.model
    custom = getattr(network, "export_outputs", None)
    if callable(custom):
        return custom, list(getattr(network, "export_layer_names", [])), getattr(network, "export_module", None)
    raise ExportError(
        f"backbone {getattr(network, 'id', type(network).__name__)!r} cannot be exported: export covers classifier "
        "networks (effnet-lite*, conse:effnet-lite* through its classifier, TorchClassifier); CLIP/SigLIP "
        "backbones run on torch only"
    )


class _Graph(torch.nn.Module):
    """The forward as a module returning a tuple in manifest order (what the ONNX exporter traces)."""

    def __init__(self, forward: Callable[[torch.Tensor], dict[str, torch.Tensor]], keys: list[str],
                 module: torch.nn.Module | None) -> None:
        super().__init__()
        self._forward = forward
        self.keys = keys
        self.net = module  # registered, so that the weights are the graph's initializers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._forward(x)
        return tuple(out[k].float() for k in self.keys)


def _output_entries(keys: list[str]) -> list[dict[str, str]]:
    """Manifest rows: graph output name -> Features field (and layer key)."""
    entries = []
    for i, key in enumerate(keys):
        if key.startswith("layer:"):
            entries.append({"name": f"layer_{i}", "field": "layers", "key": key[len("layer:"):]})
        else:
            entries.append({"name": key, "field": key})
    return entries


def _spec_dict(spec: InputSpec) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()}


def _spec_from(d: dict[str, Any]) -> InputSpec:
    return InputSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def calibration_batches(source: Any, spec: InputSpec, *, limit: int | None = DEFAULT_CALIBRATION_IMAGES,
                        batch_size: int = 32) -> list[np.ndarray]:
    """Preprocessed batches (N, 3, S, S) float32 of up to ``limit`` images of ``source``, evenly spaced
    over it (class folders are sorted by class: every class is represented); unreadable images are skipped."""
    from oodscope.backbones.preprocess import normalize_batch, prepare_pixels
    from oodscope.io import resolve_images

    source = resolve_images(source)
    n = len(source)
    if n == 0:
        raise ExportError("no calibration images")
    count = n if limit is None else min(n, int(limit))
    rows = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
    pixels = []
    for i in rows:
        try:
            pixels.append(prepare_pixels(source.load(int(i)), spec))
        except Exception:  # noqa: BLE001 - an unreadable calibration image is skipped
            continue
    if not pixels:
        raise ExportError("none of the calibration images could be read")
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = normalize_batch(np.stack(pixels[start:start + batch_size]), spec)
        out.append(np.ascontiguousarray(batch.numpy(), dtype=np.float32))
    return out


def _export_onnx(graph: _Graph, example: torch.Tensor, path: Path, names: list[str]) -> None:
    require("onnx")
    dynamic = {INPUT_NAME: {0: "n"}, **{name: {0: "n"} for name in names}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter (dynamo=False) needs no onnxscript; its deprecation and constant-folding
        # notices say nothing about the result, which is checked against eager PyTorch below.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True)


def _quantize(fp32: Path, int8: Path, batches: list[np.ndarray], work: Path) -> dict[str, Any]:
    """Static INT8 quantisation of an ONNX graph (QDQ), calibrated on ``batches``; the head stays FP32."""
    onnx = require("onnx")
    require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = work / "prepared.onnx"
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    # FP32 stays: the final linear layer (logits, cheap) and the layers reading the image itself (on
    # EfficientNet-Lite0 keeping the stem convolution FP32 cut the penultimate error from 31 % to 23 %).
    head = [node.name for node in model.graph.node if node.op_type in ("Gemm", "MatMul")]
    first = [node.name for node in model.graph.node if INPUT_NAME in node.input and node.op_type == "Conv"]
    keep = head + [name for name in first if name not in head]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep)
    return {
        "method": "onnxruntime.quantization.quantize_static",
        "format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor",
        "calibrate_method": "minmax", "calibration_images": int(sum(len(b) for b in batches)),
        "kept_fp32": keep,
    }


def _to_openvino(onnx_path: Path, xml_path: Path) -> None:
    ov = require("openvino")
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)  # FP32 stays FP32 (the default halves it)


def export_network(
    backbone: Any,
    directory: str | os.PathLike,
    *,
    runtime: str = "onnxruntime",
    int8: bool = False,
    calibration: Iterable[np.ndarray] | None = None,
    fingerprint: str | None = None,
    check_images: np.ndarray | None = None,
    overwrite: bool = True,
) -> Path:
    """Export ``backbone``'s network to ``directory`` for ``runtime``; returns the manifest's path.

    ``backbone``: a backbone (a derived one exports its network). ``int8``: quantise, calibrated on
    ``calibration`` (preprocessed ID batches, e.g. :func:`calibration_batches`; required then).
    ``fingerprint``: the weights fingerprint the manifest records for ``backbone`` (default: the
    backbone's own; a saved model passes the fingerprint it was fitted with).
    """
    check_runtime(runtime)
    if runtime == "torch":
        raise ExportError("runtime 'torch' is the eager backbone itself: nothing to export")
    if runtime == "openvino":
        require("openvino")
    require("onnxruntime" if int8 or runtime == "onnxruntime" else "onnx")
    batches = [np.ascontiguousarray(b, dtype=np.float32) for b in (calibration or [])]
    if int8 and not batches:
        raise ExportError("INT8 needs calibration images (ID images the quantisation ranges are measured on)")
    network, _ = derived_from(backbone)
    if getattr(network, "device", "cpu") != "cpu":
        raise ExportError("export runs the network on the CPU: create the backbone with device='cpu'")
    forward, layer_names, module = network_outputs(network)
    spec = network.input_spec
    if check_images is not None:
        check_batch, check_on = torch.from_numpy(np.ascontiguousarray(check_images, dtype=np.float32)), "images"
    elif batches:
        check_batch, check_on = torch.from_numpy(batches[0][:8]), "calibration images"
    else:
        rng = np.random.default_rng(0)
        check_batch = torch.from_numpy(rng.standard_normal((4, 3, spec.size, spec.size)).astype(np.float32))
        check_on = "random inputs"
    with torch.inference_mode():
        reference = network.encode_images(check_batch.contiguous(memory_format=torch.channels_last))
        keys = list(forward(check_batch[:1]).keys())
    entries = _output_entries(keys)
    names = [e["name"] for e in entries]

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise ExportError(f"{directory} is not empty")
        if not manifest_path.is_file():
            raise ExportError(f"{directory} is not empty and holds no {MANIFEST}: refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=directory.parent))
    try:
        fp32_path = work / "fp32.onnx"
        _export_onnx(_Graph(forward, keys, module), check_batch[:2].contiguous(), fp32_path, names)
        quantization = None
        onnx_path = fp32_path
        if int8:
            onnx_path = work / "int8.onnx"
            quantization = _quantize(fp32_path, onnx_path, batches, work)
        out = work / "out"
        out.mkdir()
        if runtime == "onnxruntime":
            shutil.move(str(onnx_path), out / ONNX_FILE)
            files = [ONNX_FILE]
        else:
            _to_openvino(onnx_path, out / OPENVINO_FILE)
            files = [OPENVINO_FILE, OPENVINO_FILE.replace(".xml", ".bin")]
        head = {}
        if reference.weight is not None:
            head["weight"] = np.ascontiguousarray(reference.weight, dtype=np.float32)
            head["bias"] = np.ascontiguousarray(
                reference.bias if reference.bias is not None else np.zeros(len(reference.weight)), dtype=np.float32)
        if head:
            from safetensors.numpy import save_file

            save_file(head, str(out / HEAD_FILE))
        manifest = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "runtime": runtime,
            "precision": "int8" if int8 else "fp32",
            "files": {name: file_sha256(out / name) for name in files},
            "graph": files[0],
            "input": {"name": INPUT_NAME, "layout": "NCHW float32", "spec": _spec_dict(spec)},
            "outputs": entries,
            "embedding": "penultimate",
            "network": {"id": network.id, "fingerprint": network.weights_fingerprint(),
                        "type": type(network).__name__, "layers": layer_names,
                        "patches": "patches" in keys},
            "backbone": {"id": getattr(backbone, "id", network.id),
                         "fingerprint": fingerprint or backbone.weights_fingerprint()},
            "class_names": reference.class_names,
            "logit_scale": reference.logit_scale,
            "quantization": quantization,
            "opset": OPSET,
            "versions": _versions(runtime),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        exported = ExportedBackbone(out)
        diffs = max_abs_diff(reference, exported.encode_images(check_batch))
        manifest["check"] = {"images": len(check_batch), "on": check_on,
                             "max_abs_diff_vs_torch": diffs}
        if not int8:
            for field, diff in diffs.items():
                scale = max(1.0, float(np.abs(_field(reference, field)).max()))
                if diff > FP32_TOLERANCE * scale:
                    raise ExportError(f"the exported graph's {field} differs from eager PyTorch by {diff:.3g}: "
                                      "the export does not compute this network")
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(out, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest_path


def _versions(runtime: str) -> dict[str, str]:
    from oodscope import __version__

    out = {"oodscope": __version__, "torch": torch.__version__}
    for name in ("onnx", "onnxruntime", "openvino"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return out


def _field(features: Features, field: str) -> np.ndarray:
    if field.startswith("layers."):
        return features.layers[field[len("layers."):]]
    return getattr(features, field)


def max_abs_diff(a: Features, b: Features) -> dict[str, float]:
    """Per output (``logits``, ``penultimate``, ``patches``, ``layers.<name>``): max |a - b| over the batch."""
    out = {}
    for name in ("embedding", "logits", "penultimate", "patches"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None:
            out[name] = float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
    for key in a.layers:
        if key in b.layers:
            out[f"layers.{key}"] = float(np.abs(a.layers[key].astype(np.float64) - b.layers[key]).max())
    return out


# ------------------------------------------------------------------------------------------ reading
def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory}: no {MANIFEST}; not an oodscope export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not readable as JSON ({err})") from None
    if manifest.get("format") != EXPORT_FORMAT or manifest.get("format_version") != EXPORT_VERSION:
        raise ExportError(f"{path}: not an oodscope export of format version {EXPORT_VERSION}")
    return manifest


def describe_export(manifest: dict[str, Any]) -> str:
    """One line: runtime, precision, network and its fingerprint, outputs."""
    outputs = ", ".join(e["field"] if e["field"] != "layers" else f"layers.{e['key']}" for e in manifest["outputs"])
    text = (f"{manifest['runtime']} {manifest['precision'].upper()} export of {manifest['network']['id']} "
            f"(weights fingerprint {manifest['network']['fingerprint']}; outputs {outputs})")
    if manifest.get("quantization"):
        q = manifest["quantization"]
        text += f"; INT8 calibrated on {q['calibration_images']} ID images"
    return text


def default_threads() -> int:
    """Threads for a runtime: the same as torch uses (``torch.set_num_threads`` changes both)."""
    return max(1, torch.get_num_threads())


class ExportedBackbone:
    """A backbone whose network runs as an exported graph (see the module docstring).

    ``directory``: an export (``manifest.json`` + graph + ``head.safetensors``). ``threads``: intra-op
    threads of the runtime (default: torch's thread count). ``verify``: check the files' SHA-256 against
    the manifest. Only the CPU is used.
    """

    def __init__(self, directory: str | os.PathLike, *, threads: int | None = None, verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.runtime = check_runtime(self.manifest["runtime"])
        self.precision = self.manifest["precision"]
        require(self.runtime)
        if verify:
            for name, digest in self.manifest["files"].items():
                path = self.directory / name
                if not path.is_file():
                    raise ExportError(f"{self.directory}: {name} is missing")
                if file_sha256(path) != digest:
                    raise ExportError(f"{path} does not match the manifest's SHA-256 (changed after export)")
        network = self.manifest["network"]
        self.id = network["id"]
        self.source_fingerprint = network["fingerprint"]
        self.input_spec = _spec_from(self.manifest["input"]["spec"])
        self.device = "cpu"
        self.outputs = self.manifest["outputs"]
        self.want_patches = any(e["field"] == "patches" for e in self.outputs)
        self.want_layers = any(e["field"] == "layers" for e in self.outputs)
        self.layer_names = [e["key"] for e in self.outputs if e["field"] == "layers"]
        self.class_names = self.manifest.get("class_names")
        self.logit_scale = self.manifest.get("logit_scale")
        self.threads = int(threads) if threads else default_threads()

    def __repr__(self) -> str:
        return f"ExportedBackbone({self.id!r}, {self.runtime}, {self.precision}, {self.directory})"

    def weights_fingerprint(self) -> str:
        """Changes with the network's weights, the runtime, the precision and the graph (the cache key)."""
        files = sorted(self.manifest["files"].values())
        parts = "|".join([self.source_fingerprint, self.runtime, self.precision, *files])
        return hashlib.sha256(parts.encode()).hexdigest()[:16]

    @cached_property
    def _head(self) -> dict[str, np.ndarray]:
        path = self.directory / HEAD_FILE
        if not path.is_file():
            return {}
        from safetensors.numpy import load_file

        return load_file(str(path))

    @cached_property
    def _run(self) -> Callable[[np.ndarray], list[np.ndarray]]:
        graph = str(self.directory / self.manifest["graph"])
        names = [e["name"] for e in self.outputs]
        if self.runtime == "onnxruntime":
            ort = require("onnxruntime")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            # No busy-waiting between runs: the DataLoader workers and normalisation share these cores
            # (measured faster end-to-end on 2 shared cores; docs/export.md).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
            return lambda x: session.run(names, {INPUT_NAME: x})
        ov = require("openvino")
        core = ov.Core()
        compiled = core.compile_model(graph, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "f32",  # never bf16 / fp16 behind the user's back (INT8 runs as INT8)
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # threads float: the cores are shared with the loader and other work
        })
        ports = [compiled.output(name) for name in names]
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> list[np.ndarray]:
            result = request.infer({0: x})
            return [np.array(result[port], copy=True) for port in ports]

        return run

    def forward(self, batch: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        """The raw graph outputs for a preprocessed batch (benchmarks' speed reference)."""
        if torch.is_tensor(batch):
            batch = batch.detach().cpu().numpy()
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def encode_images(self, batch: torch.Tensor | np.ndarray) -> Features:
        values = self.forward(batch)
        out: dict[str, Any] = {"layers": {}}
        for entry, value in zip(self.outputs, values, strict=True):
            if entry["field"] == "layers":
                out["layers"][entry["key"]] = value
            else:
                out[entry["field"]] = value
        penultimate = out.get("penultimate")
        return Features(
            embedding=out.get("embedding", penultimate),
            logits=out.get("logits"),
            penultimate=penultimate,
            patches=out.get("patches"),
            layers=out["layers"],
            weight=self._head.get("weight"),
            bias=self._head.get("bias"),
            logit_scale=self.logit_scale,
            class_names=self.class_names,
            backbone_id=self.id,
        )

    def classifier_parts(self):
        raise ExportError(
            f"model-in-the-loop detectors (ODIN, GradNorm, RankFeat) differentiate through the network: they need "
            f"runtime='torch', not the {self.runtime} export"
        )


# ------------------------------------------------------------------------------------------ attaching
def with_export(backbone: Any, directory: str | os.PathLike, *, threads: int | None = None) -> Any:
    """``backbone`` with its network replaced by the export in ``directory``.

    A derived backbone (ConSE) keeps its conversion in oodscope and runs its classifier from the
    export; any other backbone becomes the :class:`ExportedBackbone`. Refused when the export is of
    another network, another input size, or lacks an output the backbone produces.
    """
    network, convert = derived_from(backbone)
    if getattr(network, "dense_layers", ()) or getattr(backbone, "dense_grid", False):
        raise ExportError(f"{network.id!r} is asked for dense feature maps (image anomaly methods), which exported "
                          "graphs do not give: run it with runtime torch")
    exported = ExportedBackbone(directory, threads=threads)
    if exported.id != network.id:
        raise ExportError(f"{directory} is an export of {exported.id!r}, not of {network.id!r}")
    if exported.input_spec.key() != network.input_spec.key():
        raise ExportError(f"{directory} expects other preprocessing ({exported.input_spec.key()}) than "
                          f"{network.id!r} ({network.input_spec.key()})")
    missing = []
    if getattr(network, "want_patches", False) and not exported.want_patches:
        missing.append("patches")
    if getattr(network, "want_layers", False) and not exported.want_layers:
        missing.append("layers")
    if missing:
        raise ExportError(f"{directory} has no {' or '.join(missing)} output, which this backbone produces: "
                          "export again from this model")
    if convert is None:
        return exported
    derived = copy.copy(backbone)  # the shared torch backbone is left as it is
    derived.classifier = exported
    derived.device = exported.device
    return derived


def check_export_matches(manifest: dict[str, Any], backbone_id: str, fingerprint: str | None,
                         where: str | os.PathLike) -> None:
    """Refuse an export made for another backbone id or other weights than a saved model's."""
    made_for = manifest.get("backbone", {})
    if made_for.get("id") != backbone_id:
        raise ExportError(f"{where} was exported for backbone {made_for.get('id')!r}, but the model uses "
                          f"{backbone_id!r}: export again (oodscope export)")
    if fingerprint is not None and made_for.get("fingerprint") != fingerprint:
        raise ExportError(
            f"{where} was exported from weights with fingerprint {made_for.get('fingerprint')}, but the model was "
            f"fitted on weights {fingerprint}: its scores would not match the calibration; export again "
            "(oodscope export)"
        )


def model_export_dir(model_dir: str | os.PathLike, runtime: str) -> Path:
    """``MODEL_DIR/export/<runtime>``: where ``oodscope export`` writes and ``OODModel.load`` reads."""
    return Path(model_dir) / MODEL_EXPORT_DIR / check_runtime(runtime)


def attach_saved_export(backbone: Any, model_dir: str | os.PathLike, runtime: str, backbone_id: str,
                        fingerprint: str | None) -> tuple[Any, dict[str, str]]:
    """A saved model's backbone on its ``export/<runtime>``, and ``{"runtime", "precision", "export"}``.

    Refused (:class:`ExportError`) when the export is missing or was made for another backbone id or
    other weights than the model records (``backbone_id``, ``fingerprint`` from ``model.json``).
    """
    where = model_export_dir(model_dir, runtime)
    if runtime == "torch":
        return backbone, {"runtime": "torch", "precision": "fp32", "export": ""}
    if not (where / MANIFEST).is_file():
        fmt = next(f for f, r in FORMATS.items() if r == runtime)
        raise ExportError(f"{model_dir} has no {runtime} export ({where}): make it with `oodscope export "
                          f"{model_dir} --format {fmt}`, or load with runtime='torch'")
    manifest = read_manifest(where)
    check_export_matches(manifest, backbone_id, fingerprint, where)
    return with_export(backbone, where), {"runtime": runtime, "precision": manifest["precision"], "export": str(where)}


def export_cache_root() -> Path:
    root = os.environ.get("OODSCOPE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "oodscope") / "exports"


def with_runtime(backbone: Any, runtime: str | None, *, export_dir: str | os.PathLike | None = None,
                 threads: int | None = None) -> Any:
    """``backbone`` on ``runtime`` ("torch" returns it unchanged; None: the runtime of ``export_dir``).

    With ``export_dir`` that export is used; otherwise the FP32 network is exported once into
    ``$OODSCOPE_CACHE/exports`` (keyed by the network's id, weights fingerprint, preprocessing,
    outputs and the runtime) and reused. INT8 exports are made explicitly (``oodscope export --int8``).
    """
    if runtime is None:
        runtime = read_manifest(export_dir)["runtime"] if export_dir is not None else "torch"
    check_runtime(runtime)
    if runtime == "torch":
        if export_dir is not None:
            raise ExportError("export_dir= is for runtime='onnxruntime' or 'openvino'")
        return backbone
    if export_dir is not None:
        found = read_manifest(export_dir)["runtime"]
        if found != runtime:
            raise ExportError(f"{export_dir} is a {found} export, not {runtime}")
        return with_export(backbone, export_dir, threads=threads)
    network, _ = derived_from(backbone)
    _, layer_names, _ = network_outputs(network)
    key_parts = [network.id, network.weights_fingerprint(), network.input_spec.key(),
                 str(bool(getattr(network, "want_patches", False))), ",".join(layer_names), runtime,
                 str(EXPORT_VERSION), str(OPSET)]
    key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in network.id)
    target = export_cache_root() / f"{safe}-{runtime}-{key}"
    if not (target / MANIFEST).is_file():
        export_network(network, target, runtime=runtime)
    return with_export(backbone, target, threads=threads)


