"""``oodscope serve MODEL_DIR``: the scoring service (FastAPI under uvicorn); see docs/serve.md.

Serves one or more saved models (``NAME=MODEL_DIR`` names one; the first is the default) on
``--host``/``--port``; every scored image is recorded in ``--store`` (a SQLite file by default, or a
``postgresql://`` URL). With ``--api-keys FILE`` (lines ``name:scope:sha256hex``, scopes ``read`` and
``admin``) requests need ``Authorization: Bearer KEY``; binding to an address other than loopback
without keys is refused unless ``--insecure`` is given. ``oodscope serve --hash-key`` makes a key
and its key-file line. Exit codes: 0 = stopped cleanly; 1 = could not start (a model or the store
could not be opened, the port is taken); 2 = bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import sys
from pathlib import Path

from oodscope.backbones.base import RUNTIMES

HELP = "serve saved models over HTTP, with a monitoring store and shift alarms"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def register(sub) -> None:
    parser = sub.add_parser("serve", help=HELP, description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL_DIR",
                        help="saved model directories (oodscope fit -o ...), optionally NAME=MODEL_DIR")
    net = parser.add_argument_group("network and access")
    net.add_argument("--host", default="127.0.0.1", help="address to bind")
    net.add_argument("--port", type=int, default=8000, help="port to bind")
    net.add_argument("--api-keys", type=Path, default=None, metavar="FILE",
                     help="key file: name:scope:sha256hex lines (scope read or admin)")
    net.add_argument("--insecure", action="store_true",
                     help="allow binding a non-loopback address without API keys")
    net.add_argument("--limit-concurrency", type=int, default=256,
                     help="open connections beyond which uvicorn answers 503")
    net.add_argument("--metrics-open", action="store_true", help="serve /metrics without a key")
    net.add_argument("--hash-key", nargs="?", const="", default=None, metavar="KEY",
                     help="print a key-file line for KEY ('-' reads it from stdin; none given: a new random key) "
                          "and exit")
    net.add_argument("--key-name", default="client", help="name of the key made by --hash-key")
    net.add_argument("--scope", default="read", choices=("read", "admin"), help="scope of the key made by --hash-key")
    store = parser.add_argument_group("monitoring store")
    store.add_argument("--store", default="oodscope-store.db", metavar="URL",
                       help="SQLite file or sqlite:///PATH, or postgresql://user@host/db")
    store.add_argument("--store-images", action="store_true", help="also keep every scored image in the store")
    store.add_argument("--store-sync", default="full", choices=("full", "normal"),
                       help="SQLite: fsync every commit (full: survives kill -9 and power loss) or leave the WAL to "
                            "the OS (normal: survives kill -9, not a machine crash)")
    store.add_argument("--retention-days", type=float, default=None, help="delete records older than this")
    store.add_argument("--retention-records", type=int, default=None, help="keep at most this many records")
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument("--max-batch", type=int, default=64, help="images per forward pass")
    limits.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    limits.add_argument("--no-batching", action="store_true", help="one request per forward pass")
    limits.add_argument("--fixed-batch", action="store_true",
                        help="always gather up to --max-batch images (default: the batch size measured fastest per "
                             "image, up to --max-batch)")
    limits.add_argument("--max-queue", type=int, default=512, help="images in flight beyond which requests get 503")
    limits.add_argument("--max-images", type=int, default=64, help="images per request")
    limits.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (413 beyond)")
    limits.add_argument("--max-pixels", type=int, default=40_000_000, help="pixels per image (decompression-bomb "
                                                                           "guard)")
    limits.add_argument("--timeout", type=float, default=30.0, help="seconds per request (504 beyond)")
    alarms = parser.add_argument_group("shift alarms")
    alarms.add_argument("--alarm-delta", type=float, default=0.01,
                        help="false-alarm probability of a shift alarm on an unshifted stream (alarm at M >= 1/delta)")
    alarms.add_argument("--webhook", default=None, metavar="URL", help="POST alarm events (JSON) to this URL")
    model = parser.add_argument_group("models")
    model.add_argument("--backbone-factory", default=None, metavar="MODULE:CALLABLE",
                       help="for models fitted on a backbone object: a function returning that backbone")
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--runtime", choices=RUNTIMES, default="torch",
                       help="run the network on torch (default) or on the model's export (oodscope export)")
    model.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads for the forward pass (default: torch's choice, one per core)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"oodscope serve: error: {message}", file=sys.stderr)
    return code


def _hash_key(args: argparse.Namespace) -> int:
    from oodscope.serve.auth import hash_key, new_key, parse_line

    key = args.hash_key
    made = False
    if key == "-":
        key = sys.stdin.readline().strip()
    elif not key:
        key, made = new_key(), True
    if not key:
        return _fail("no key given on stdin")
    line = f"{args.key_name}:{args.scope}:{hash_key(key)}"
    try:
        parse_line(line)
    except ValueError as err:
        return _fail(str(err))
    if made:
        print(f"key (shown once; give it to the client): {key}", file=sys.stderr)
    print(line)
    return EXIT_OK


def _factory(spec: str | None):
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--backbone-factory must be MODULE:CALLABLE, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--backbone-factory {spec}: {err}") from None
    if not callable(factory):
        raise ValueError(f"--backbone-factory {spec} is not callable")
    return factory


def _models(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        directory = Path(path if sep else spec)
        name = name if sep else directory.resolve().name
        if not (directory / "model.json").is_file():
            raise ValueError(f"{directory} is not a saved oodscope model (no model.json)")
        if name in out:
            raise ValueError(f"two models are named {name!r}: name them NAME=MODEL_DIR")
        out[name] = directory
    return out


def run(args: argparse.Namespace) -> int:
    if args.hash_key is not None:
        return _hash_key(args)
    if not args.models:
        return _fail("give at least one MODEL_DIR (or --hash-key to make an API key)")
    from oodscope.serve import missing

    absent = missing()
    if absent:
        return _fail(f"the service needs {', '.join(absent)}: pip install 'oodscope[serve]'", EXIT_FAILED)
    from oodscope.serve.auth import KeyFileError, KeyRing, load_keys
    from oodscope.serve.config import ServeConfig

    try:
        models = _models(args.models)
        keys = KeyRing(load_keys(args.api_keys)) if args.api_keys is not None else KeyRing()
        if args.api_keys is not None and not keys.enabled:
            raise ValueError(f"{args.api_keys} holds no key")
        if not is_loopback(args.host) and not keys.enabled and not args.insecure:
            raise ValueError(f"refusing to serve on {args.host} (not a loopback address) without API keys: give "
                             "--api-keys FILE, or --insecure to accept unauthenticated requests from the network")
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {args.port}")
        config = ServeConfig(
            max_batch_images=args.max_batch, max_wait_ms=args.max_wait_ms, batching=not args.no_batching,
            adaptive_batch=not args.fixed_batch,
            max_queue_images=args.max_queue, max_images_per_request=args.max_images,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_pixels=args.max_pixels,
            request_timeout_s=args.timeout, store_images=args.store_images, store_sync=args.store_sync,
            retention_days=args.retention_days,
            retention_records=args.retention_records, shift_delta=args.alarm_delta, webhook_url=args.webhook,
            metrics_require_key=not args.metrics_open)
        factory = _factory(args.backbone_factory)
    except (KeyFileError, ValueError) as err:
        return _fail(str(err))
    if args.threads is not None:
        if args.threads < 1:
            return _fail(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    import uvicorn

    from oodscope.serve import create_app
    from oodscope.serve.store import StoreError

    try:
        app = create_app(models, store=args.store, api_keys=keys, config=config, backbone=factory,
                         device=args.device, runtime=args.runtime)
    except StoreError as err:
        return _fail(str(err), EXIT_FAILED)
    except (ValueError, OSError, ImportError, KeyError) as err:
        return _fail(f"cannot load the model(s): {err}", EXIT_FAILED)
    if not keys.enabled:
        print(f"oodscope serve: note: no API keys: anyone who can reach {args.host}:{args.port} may score and "
              "administer", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           limit_concurrency=args.limit_concurrency, timeout_graceful_shutdown=10,
                                           access_log=args.log_level == "debug"))
    server.run()
    return EXIT_OK if server.started else EXIT_FAILED
