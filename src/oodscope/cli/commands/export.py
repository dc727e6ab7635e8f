"""``oodscope export MODEL_DIR --format onnx|openvino [--int8 --calibration DATA] [-o OUT]``: the model's
network as an ONNX Runtime or OpenVINO graph, for fast CPU scoring.

The graph computes every output the model's detector reads (logits, penultimate features, patches
or layers when the backbone produces them); the detector, a derived backbone's conversion (ConSE)
and the calibration stay in oodscope. It is written to ``MODEL_DIR/export/<runtime>/`` (default
``-o``) with ``manifest.json`` (backbone id, weights fingerprint, input spec, outputs, precision),
checked against eager PyTorch on a few images, and used by ``OODModel.load(MODEL_DIR,
runtime="onnxruntime")``. ``--int8`` quantises it (static, calibrated on the ID images of
``--calibration``); with ``--test-id`` (and ``--test-ood``) the change in AUROC and in OOD decisions
against the PyTorch model is printed and recorded in the manifest, for FP32 as for INT8.

Exit codes: 0 = exported; 1 = the export failed (runtime not installed, a backbone that cannot be
exported, a graph that does not match PyTorch); 2 = bad arguments, refused before any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oodscope.cli.commands._common import (
    EXIT_OK,
    UsageError,
    add_max_pixels_option,
    add_model_options,
    add_overwrite_option,
    check_output,
    checking,
    counted,
    open_images,
)

HELP = "export a model's network to ONNX Runtime or OpenVINO (FP32 or INT8) for fast CPU scoring"


def register(sub) -> None:
    parser = sub.add_parser("export", help=HELP, description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="model directory written by `oodscope fit`")
    parser.add_argument("--format", required=True, choices=["onnx", "openvino"],
                        help="onnx: run by ONNX Runtime; openvino: OpenVINO IR")
    parser.add_argument("--int8", action="store_true",
                        help="static INT8 quantisation, calibrated on --calibration (reported, never implied)")
    parser.add_argument("--calibration", default=None, metavar="DATA",
                        help="ID images the INT8 ranges are measured on (folder, list, registered name)")
    parser.add_argument("--calibration-images", type=counted(1), default=256, metavar="N",
                        help="use at most N of them, evenly spaced (default 256)")
    parser.add_argument("--test-id", default=None, metavar="DATA",
                        help="ID test images: report how scores and OOD decisions change against PyTorch")
    parser.add_argument("--test-ood", default=None, metavar="DATA", help="OOD test images (AUROC change too)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="export directory (default MODEL_DIR/export/<runtime>, where OODModel.load finds it)")
    add_overwrite_option(parser, "an existing export there is replaced")
    add_model_options(parser, ("batch_size", "num_workers"))
    add_max_pixels_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oodscope.backbones.exported import (
        calibration_batches,
        describe_export,
        export_network,
        model_export_dir,
        read_manifest,
        require,
        runtime_of_format,
        with_export,
    )
    from oodscope.pipeline import OODModel
    from oodscope.pipeline.persistence import read_config

    runtime = runtime_of_format(args.format)
    with checking():
        config = read_config(args.model)
    if config.get("kind") == "model":
        raise UsageError(f"{config['method']} differentiates through the network (a model-in-the-loop detector): "
                         "it runs on PyTorch only, there is nothing to export")
    if args.int8 and args.calibration is None:
        raise UsageError("--int8 needs --calibration DATA: ID images to measure the quantisation ranges on")
    if args.calibration is not None and not args.int8:
        raise UsageError("--calibration is for --int8 (an FP32 export needs no calibration images)")
    if args.test_ood is not None and args.test_id is None:
        raise UsageError("--test-ood needs --test-id (the AUROC compares ID and OOD scores)")
    calibration = open_images(args.calibration, "--calibration") if args.calibration is not None else None
    test_id = open_images(args.test_id, "--test-id") if args.test_id is not None else None
    test_ood = open_images(args.test_ood, "--test-ood") if args.test_ood is not None else None
    default_output = model_export_dir(args.model, runtime)
    output = args.output or default_output
    check_output(output, overwrite=args.overwrite, kind="dir", markers=["manifest.json"], what="the export")
    require("onnx")
    require(runtime)
    if args.int8:
        require("onnxruntime")  # the quantiser

    loading = {"batch_size": args.batch_size, "num_workers": args.num_workers, "progress": False}
    model = OODModel.load(args.model, device="cpu", **loading)
    batches = None
    if calibration is not None:
        batches = calibration_batches(calibration, model.backbone.input_spec, limit=args.calibration_images)
    check = calibration_batches(test_id, model.backbone.input_spec, limit=16)[0] if test_id is not None else None
    manifest_path = export_network(model.backbone, output, runtime=runtime, int8=args.int8, calibration=batches,
                                   fingerprint=config["backbone"]["fingerprint"], check_images=check,
                                   overwrite=True)
    manifest = read_manifest(output)
    size = sum((output / name).stat().st_size for name in manifest["files"]) / 1e6
    print(f"exported {describe_export(manifest)} -> {output} ({size:.1f} MB)")
    diffs = manifest["check"]["max_abs_diff_vs_torch"]
    print(f"max |difference| vs eager PyTorch on {manifest['check']['images']} {manifest['check']['on']}"
          f"{' (test ID)' if check is not None else ''}: "
          + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    if test_id is not None:
        from oodscope.evaluation.runtime_check import compare_runtimes

        if output == default_output:
            other = OODModel.load(args.model, runtime=runtime, **loading)
        else:
            other = OODModel.load(args.model, backbone=with_export(model.backbone, output),
                                  verify_backbone=False, **loading)
        if not (model.is_calibrated and other.is_calibrated):
            print("the model is not calibrated: no OOD decisions to compare", file=sys.stderr)
        else:
            label = f"{runtime}-{manifest['precision']}"
            result = compare_runtimes(model, other, test_id, test_ood, names=("torch-fp32", label))
            print(f"against the PyTorch model on the test images (alpha = {model.alpha:g}):")
            for line in result.lines():
                print("  " + line)
            manifest["evaluation"] = {"test_id": args.test_id, "test_ood": args.test_ood, **result.to_dict()}
            manifest_path.write_text(json.dumps(manifest, indent=2))
    if manifest["precision"] == "int8":
        print("INT8 changes scores, and the model's calibration was made on PyTorch FP32 scores: "
              + ("check them with --test-id/--test-ood before deploying" if test_id is None else
                 "where the ID false-alarm rate must hold, fit and calibrate on this export (docs/export.md)"),
              file=sys.stderr)
    if output == default_output:
        print(f"score with it: OODModel.load({str(args.model)!r}, runtime={runtime!r})")
    else:
        print(f"use it with: oodscope.backbones.create(SPEC, export_dir={str(output)!r})")
    return EXIT_OK
