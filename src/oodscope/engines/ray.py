"""The Ray engine: feature extraction and scoring over a Ray cluster (Ray Data), with one machine's results.

::

    from oodscope.engines import ray as ray_engine

    result = ray_engine.extract("effnet-lite0", "fashion-mnist/test", cache_dir="features", address="auto")
    run = ray_engine.score("model_dir", ["incoming/"], "scores/", address="auto")
    table = run.table()            # pyarrow: the columns of `oodscope score --format csv`

The pipeline, one Ray Data dataset per job::

    partitions of the input (driver: paths from the one data resolver, resolve_images)
      -> prepare   CPU tasks: read bytes, content hash, decode, resize      (oodscope.engines.workers.prepare)
      -> forward   actor pool, one backbone per actor, GPU actors when the cluster has GPUs;
                   score: the saved OODModel (loaded once per actor, from the object store) scores
                   and decides; each partition is written atomically by its actor (workers.Forward)

Results are those of the local engine: the per-image step is local extraction's, decisions are
:func:`oodscope.pipeline.decisions.predict_chunk`, extraction fills the same feature store (a local
``extract``, ``fit`` or ``bench`` afterwards finds every image cached). Unreadable images are
collected with their reason, as locally, and never fail the job.

**Resume and faults** (:mod:`oodscope.engines.jobs`): a re-run of the same job skips the partitions
already written; a worker process that dies is restarted (actors) or retried (tasks) by Ray, up to
:data:`MAX_RETRIES` times, and its partition is rewritten whole under the same name, so each image
is in the output exactly once. A crash that repeats on every try (a decoder segfault on one file)
fails the job after those tries; a re-run resumes after the partitions written.

**Where things live**: workers read images and write outputs by path, so with more than one node
the images, the feature store and the output directory must be on a filesystem every node sees
(the saved model need not be: it travels in Ray's object store). Every node needs the same
oodscope, backbone packages and weights (checked: a worker whose backbone configuration differs
from the driver's fails the job).

**Connection** (``address``): ``None`` joins the cluster of ``RAY_ADDRESS`` when it is set, else
starts a one-machine cluster for this process on 127.0.0.1; ``"auto"`` joins the cluster ``ray
start`` runs on this machine; ``"HOST:PORT"`` / ``"ray://HOST:PORT"`` a remote head. A process
already connected (``ray.init`` called) keeps its connection.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from oodscope.engines import EngineUnavailable, check_engine, loopback_only
from oodscope.engines.jobs import (
    DEFAULT_PARTITION_SIZE,
    ScorePlan,
    ScoreRun,
    done_partitions,
    finish_score,
    inputs_key,
    part_name,
    partition_bounds,
    plan_score,
    read_record,
    records_dir,
    write_job,
)
from oodscope.engines.workers import ForwardSpec, PrepareSpec

#: How often Ray restarts a dead actor / retries a task whose worker died, before the job fails.
MAX_RETRIES = 3

__all__ = ["DEFAULT_PARTITION_SIZE", "RayJobError", "ScorePlan", "ScoreRun", "connect", "extract", "plan_score",
           "score"]


class RayJobError(RuntimeError):
    """The Ray job itself failed (not one image: those are collected); the message is one line."""


# ------------------------------------------------------------------------------------------ connection
def connect(address: str | None = None, *, num_cpus: int | None = None):
    """The ``ray`` module, connected to a cluster (see the module docstring for ``address``)."""
    check_engine("ray", address)
    start_here = address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))
    target = None if start_here else _target(address)
    if start_here or (target is not None and _is_loopback(target[0])):
        loopback_only()  # a cluster on 127.0.0.1: this driver on 127.0.0.1 too (Ray would use the machine's IP)
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise EngineUnavailable(f"the Ray engine needs Ray Data, which does not import here ({err}): pip install "
                                "'oodscope[ray]'") from None
    if not ray.is_initialized():
        if start_here:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     _node_ip_address="127.0.0.1")
        else:
            if target is not None:
                _check_reachable(*target)  # Ray itself retries an unreachable head for minutes
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except ConnectionError as err:
                hint = ""
                if address not in (None, "auto") and not os.environ.get("RAY_AUTH_MODE"):
                    hint = ("; a cluster with token authentication (the default of `ray start` in recent Ray) is "
                            "joined by address with RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or "
                            "~/.ray/auth_token); --address auto finds it on the head's machine")
                first = (str(err).strip().splitlines() or [""])[0].split(". Last connection error")[0]
                raise ConnectionError(f"cannot join the Ray cluster at {address} ({first}){hint}") from None
            except Exception as err:
                if type(err).__module__.startswith("ray"):
                    raise RayJobError(f"cannot join the Ray cluster at {address}: {_one_line(err)}") from None
                raise
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one oodscope progress bar instead
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    return ray


def _target(address: str | None) -> tuple[str, int] | None:
    """(host, port) that ``address`` points to: HOST:PORT, ray://HOST:PORT, ``$RAY_ADDRESS`` for None, and for
    ``auto`` the cluster ``ray start`` recorded on this machine; None when unknown."""
    if address is None:
        address = os.environ.get("RAY_ADDRESS")
    if address == "auto":
        record = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        try:
            address = record.read_text().strip().splitlines()[0]
        except (OSError, IndexError):
            return None
    if not address or address in ("auto", "local"):
        return None
    text = address.split("://", 1)[-1]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_reachable(host: str, port: int, timeout: float = 10.0) -> None:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {host}:{port} ({err.strerror or err}); is it "
                              "running (`ray start --head ...`, `ray status`)?") from None


def _plan_workers(ray, *, num_actors: int | None, actor_cpus: float, task_cpus: float,
                  gpu: bool) -> tuple[int, bool]:
    """(actors, whether they take a GPU each), checked against what the cluster has."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    use_gpu = gpu and gpus >= 1
    if num_actors is None:
        num_actors = gpus if use_gpu else max(1, int(cpus // 2 // max(actor_cpus, 1e-9)))
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if use_gpu and num_actors > gpus:
        raise ValueError(f"{num_actors} GPU actors asked for, the cluster has {gpus} GPU(s)")
    needed = num_actors * actor_cpus + task_cpus
    if needed > cpus + 1e-9:
        raise ValueError(f"the cluster has {cpus:g} CPU(s); {num_actors} actor(s) x {actor_cpus:g} CPU + "
                         f"{task_cpus:g} CPU for a decode task need {needed:g} (fewer actors, or fractional "
                         "actor_cpus / task_cpus)")
    return num_actors, use_gpu


def _items(ray, rows: list[dict[str, Any]]):
    try:
        return ray.data.from_items(rows, override_num_blocks=len(rows))
    except TypeError:  # Ray < 2.10
        return ray.data.from_items(rows, parallelism=len(rows))


def _run(ray, pending: list[int], prepare_spec: PrepareSpec, forward_spec: ForwardSpec, *, num_actors: int | None,
         actor_cpus: float, task_cpus: float, gpu: bool, total: int, done: int, progress: bool,
         description: str) -> list[dict[str, Any]]:
    """Run the two stages over the pending partitions; the actors' summary rows, one per partition."""
    from tqdm.auto import tqdm

    from oodscope.engines import workers

    actors, use_gpu = _plan_workers(ray, num_actors=num_actors, actor_cpus=actor_cpus, task_cpus=task_cpus, gpu=gpu)
    if use_gpu:
        forward_spec = _replace(forward_spec, device="cuda")
    prepare_ref, forward_ref = ray.put(prepare_spec), ray.put(forward_spec)  # once, shared by every worker
    ds = _items(ray, [{"part": k} for k in pending])
    with warnings.catch_warnings():
        # Retry limits are Ray "remote args"; Ray 2.60 announces another spelling without providing one yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*", category=DeprecationWarning)
        ds = ds.map_batches(workers.prepare, batch_size=1, batch_format="numpy", fn_kwargs={"spec": prepare_ref},
                            num_cpus=task_cpus, max_retries=MAX_RETRIES)
        ds = ds.map_batches(workers.Forward, batch_size=1, batch_format="numpy",
                            fn_constructor_kwargs={"spec": forward_ref},
                            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus,
                            num_gpus=1 if use_gpu else None, max_restarts=MAX_RETRIES,
                            max_task_retries=MAX_RETRIES)
    rows = []
    bar = tqdm(total=total, initial=done, unit="img", desc=f"{description} (ray)", disable=not progress,
               dynamic_ncols=True)
    try:
        failed = 0
        for row in ds.iter_rows():
            rows.append(dict(row))
            failed += int(row["failed"])
            bar.update(int(row["n"]))
            if failed:
                bar.set_postfix(failed=failed, refresh=False)
    except Exception as err:
        if type(err).__module__.startswith("ray") or isinstance(err, ray.exceptions.RayError):
            raise RayJobError(f"the Ray job failed: {_one_line(err)}") from err
        raise
    finally:
        bar.close()
    return rows


def _one_line(err: BaseException) -> str:
    """The innermost cause of a Ray error as ``Type: message`` in one line (Ray's text carries remote
    tracebacks and advice)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__
    ours = [e for e in chain if not type(e).__module__.startswith("ray")]
    pick = ours[-1] if ours else chain[-1]
    lines = [line.strip() for line in str(pick).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return (f"{type(pick).__name__}: {text}" if text else type(pick).__name__)[:500]


def _replace(spec, **changes):
    import dataclasses

    return dataclasses.replace(spec, **changes)


def _pixel_limits() -> tuple[int | None, int | None]:
    from PIL import Image

    from oodscope.io import ImageSource

    return ImageSource.max_pixels, Image.MAX_IMAGE_PIXELS


def _on_gpu(device: str | None, backbone: Any) -> bool:
    """Whether the actors should take GPUs: a spec created on the workers (device unset or cuda), or an
    object already on CUDA."""
    if not isinstance(backbone, str) and backbone is not None:
        return str(getattr(backbone, "device", "cpu")).startswith("cuda")
    return device is None or str(device).startswith("cuda")


# ------------------------------------------------------------------------------------------ extract
def extract(
    backbone: Any,
    data: Any,
    *,
    cache_dir: str | os.PathLike,
    backbone_options: dict[str, Any] | None = None,
    device: str | None = None,
    address: str | None = None,
    batch_size: int = 64,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    num_actors: int | None = None,
    actor_cpus: float = 1.0,
    task_cpus: float = 1.0,
    progress: bool = True,
    keep_in_memory: bool = True,
    description: str = "extract",
):
    """:func:`oodscope.features.extract.extract` on a Ray cluster: the same
    :class:`~oodscope.features.extract.ExtractionResult` and the same feature store in ``cache_dir``.

    ``backbone``: a spec string (created on each actor, on its GPU when the cluster has GPUs) or a
    backbone object (sent to the actors once, through the object store; it runs on its own device).
    ``data``: any data spec of :func:`oodscope.io.resolve_images`. ``n_computed`` counts the images this
    run computed; images in the store before, or in partitions an earlier run wrote, count as cached.
    """
    from oodscope.backbones import create_shared
    from oodscope.backbones.base import derived_from
    from oodscope.features.extract import ExtractionResult, LoadFailure, backbone_config, store_dir
    from oodscope.features.store import FeatureStore
    from oodscope.io import resolve_images

    if cache_dir is None:
        raise ValueError("the Ray engine extracts into a feature store: give cache_dir")
    started = time.perf_counter()
    source = resolve_images(data)
    options = dict(backbone_options or {})
    here = create_shared(backbone, **options) if isinstance(backbone, str) else backbone
    network, derive = derived_from(here)
    config = backbone_config(network)
    store = FeatureStore(store_dir(cache_dir, config), config)  # another configuration in cache_dir: refused here
    ids = [source.item_id(i) for i in range(len(source))]
    bounds = partition_bounds(len(source), partition_size)
    records = records_dir(store.root, inputs_key(ids, partition_size))
    done = done_partitions(records, ".json", len(bounds))
    pending = [k for k in range(len(bounds)) if k not in done]
    computed_now: set[int] = set()
    if pending:
        ray = connect(address)
        records.mkdir(parents=True, exist_ok=True)
        known = np.array(sorted(store.index), dtype="S16") if store.index else None
        prepare_spec = PrepareSpec(source, network.input_spec, len(source), partition_size, known, *_pixel_limits())
        forward_spec = ForwardSpec("extract", batch_size, device,
                                   backbone=backbone if isinstance(backbone, str) else network,
                                   backbone_options=options, config=config, store_root=str(store.root),
                                   records=str(records))
        rows = _run(ray, pending, prepare_spec, forward_spec, num_actors=num_actors, actor_cpus=actor_cpus,
                    task_cpus=task_cpus, gpu=_on_gpu(device, backbone if isinstance(backbone, str) else network),
                    total=len(source), done=sum(bounds[k][1] - bounds[k][0] for k in done), progress=progress,
                    description=description)
        computed_now = {int(r["part"]) for r in rows}
    indices: list[int] = []
    hashes: list[bytes] = []
    failures: list[LoadFailure] = []
    n_computed = n_cached = 0
    for k in range(len(bounds)):
        record = read_record(records / part_name(k, ".json"))
        for index, digest in record["ok"]:
            indices.append(int(index))
            hashes.append(bytes.fromhex(digest))
        failures += [LoadFailure(int(i), item, reason) for i, item, reason in record["failures"]]
        if k in computed_now:
            n_computed += record["computed"]
            n_cached += record["cached"]
        else:
            n_cached += len(record["ok"])
    store = FeatureStore(store.root, config)  # re-read: it now holds the chunks the workers wrote
    labels = None
    if getattr(source, "labels", None) is not None:
        labels = np.asarray(source.labels)[np.asarray(indices, dtype=np.int64)]
    result = ExtractionResult(indices=np.asarray(indices, dtype=np.int64), item_ids=[ids[i] for i in indices],
                              hashes=hashes, labels=labels, failures=failures, n_computed=n_computed,
                              n_cached=n_cached, seconds=time.perf_counter() - started, store=store, derive=derive)
    if keep_in_memory and hashes:
        result._features = store.gather(hashes)
    return result


# ------------------------------------------------------------------------------------------ score
def score(
    model_dir: str | os.PathLike | None = None,
    images: Any = None,
    out_dir: str | os.PathLike | None = None,
    *,
    plan: ScorePlan | None = None,
    backbone: Any = None,
    device: str | None = None,
    address: str | None = None,
    batch_size: int = 64,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    num_actors: int | None = None,
    actor_cpus: float = 1.0,
    task_cpus: float = 1.0,
    overwrite: bool = False,
    progress: bool = True,
    runtime: str = "torch",
) -> ScoreRun:
    """Score images with a saved :class:`~oodscope.pipeline.OODModel` on a Ray cluster; rows go to
    ``out_dir/part-NNNNNN.parquet`` (the columns of ``oodscope score --format csv``, in input order).

    The same rows as ``OODModel.load(model_dir).predict(images)`` (scores, p-values, decisions, classes,
    prediction sets; unreadable images as rows with an ``error``). ``backbone``: for a model fitted on a
    backbone object (as :meth:`OODModel.load`). A re-run into the same ``out_dir`` resumes.
    """
    from oodscope.pipeline import OODModel

    started = time.perf_counter()
    if plan is None:
        if model_dir is None or images is None or out_dir is None:
            raise ValueError("score needs model_dir, images and out_dir (or a plan from plan_score)")
        plan = plan_score(model_dir, images, out_dir, partition_size=partition_size, overwrite=overwrite,
                          runtime=runtime)
    job = plan.job
    # Loaded here too: a model for another backbone or other weights is refused before the cluster is used,
    # and the tasks need the network's input size.
    model = OODModel.load(plan.model_dir, backbone=backbone, device="cpu", progress=False, runtime=plan.runtime)
    from oodscope.backbones.base import derived_from

    network, _ = derived_from(model.backbone)
    write_job(plan.out, job)
    bounds = partition_bounds(job.images, job.partition_size)
    done = done_partitions(plan.out, ".parquet", len(bounds))
    pending = [k for k in range(len(bounds)) if k not in done]
    if pending:
        ray = connect(address)
        prepare_spec = PrepareSpec(plan.source, network.input_spec, job.images, job.partition_size, None,
                                   *_pixel_limits())
        forward_spec = ForwardSpec("score", batch_size, device, backbone=backbone, model_files=plan.files,
                                   runtime=plan.runtime,
                                   out_dir=str(plan.out.absolute()))
        _run(ray, pending, prepare_spec, forward_spec, num_actors=num_actors, actor_cpus=actor_cpus,
             task_cpus=task_cpus, gpu=plan.runtime == "torch" and _on_gpu(device, backbone), total=job.images,
             done=sum(bounds[k][1] - bounds[k][0] for k in done), progress=progress, description="score")
    return finish_score(plan, model, written=len(pending), skipped=len(done), started=started)
