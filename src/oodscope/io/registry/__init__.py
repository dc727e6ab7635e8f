"""Registry of evaluation data sets: what each is, where it comes from, how to get it, how to check it.

Every entry is a :class:`DatasetSpec` named with one syntax, ``family/part`` (``fashion-mnist/test``,
``textiles/local``, ``openood-v1.5/cifar10/near/tin``; a few whole sets are plain names: ``digits``,
``textiles``, ``dtd``). ``get_dataset(name, root)`` returns an :class:`~oodscope.io.ImageSource`;
``check_dataset(name, root)`` verifies a copy placed by hand (file counts, listed files present,
checksums); ``download_dataset(name, root)`` fetches the entries that have a plain HTTP(S) URL
(resumable with HTTP ``Range``, checksum-verified). ``get_benchmark(name)`` returns a published
protocol (:class:`Benchmark`).

Modules:

* :mod:`~oodscope.io.registry.specs` -- DatasetSpec, Benchmark, FileChecksum, the errors, the
  registry and its register / list / get functions, ``data_root``;
* :mod:`~oodscope.io.registry.download` -- ``check_dataset``, ``download_file``, ``download_dataset``,
  ``extract_archive``;
* the catalogues, registered when this package is imported:
  :mod:`~oodscope.io.registry.catalog_offline` (Fashion-MNIST, Fashion-MNIST-OOD and its benchmark,
  scikit-learn digits, conformal-clip-data textiles: offline, from installed packages),
  :mod:`~oodscope.io.registry.catalog_openood` (OpenOOD v1.5 CIFAR-10 / CIFAR-100 / ImageNet-200 /
  ImageNet-1K splits and benchmarks, read from OpenOOD's data folder, placed by hand),
  :mod:`~oodscope.io.registry.catalog_zero_shot` (the MCM zero-shot CLIP protocol: ImageNet-1K val vs
  MOS iNaturalist / SUN / Places and Textures), :mod:`~oodscope.io.registry.catalog_anomaly` (MVTec AD,
  VisA, MPDD with masks; the offline ``synthetic-ad`` pixel benchmark and ``textiles-ad``),
  :mod:`~oodscope.io.registry.catalog_clipart` (Open Clip Art drawings, offline from Debian's
  openclipart-png, and the ``openclipart`` zero-shot benchmark).

Where the data live: ``root`` if given, else ``$OODSCOPE_DATA/<entry folder>``, else
``~/.cache/oodscope/data/<entry folder>``.
"""

from __future__ import annotations

from oodscope.io.registry import (  # noqa: F401
    catalog_anomaly,
    catalog_clipart,
    catalog_offline,
    catalog_openood,
    catalog_zero_shot,
)
from oodscope.io.registry.catalog_anomaly import (
    MPDD_CATEGORIES,
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    anomaly_categories,
)
from oodscope.io.registry.catalog_openood import OPENOOD_SPLITS
from oodscope.io.registry.download import (
    CheckReport,
    check_dataset,
    download_dataset,
    download_file,
    extract_archive,
    file_digest,
)
from oodscope.io.registry.specs import (
    BENCHMARKS,
    DATA_ENV,
    Benchmark,
    ChecksumMismatch,
    DatasetNotAvailable,
    DatasetSpec,
    DownloadError,
    FileChecksum,
    data_root,
    get_benchmark,
    get_dataset,
    get_spec,
    known_name,
    list_benchmarks,
    list_datasets,
    register_benchmark,
    register_dataset,
)

__all__ = [
    "BENCHMARKS",
    "DATA_ENV",
    "MPDD_CATEGORIES",
    "MVTEC_CATEGORIES",
    "OPENOOD_SPLITS",
    "VISA_CATEGORIES",
    "Benchmark",
    "ChecksumMismatch",
    "CheckReport",
    "DatasetNotAvailable",
    "DatasetSpec",
    "DownloadError",
    "FileChecksum",
    "anomaly_categories",
    "check_dataset",
    "data_root",
    "download_dataset",
    "download_file",
    "extract_archive",
    "file_digest",
    "get_benchmark",
    "get_dataset",
    "get_spec",
    "known_name",
    "list_benchmarks",
    "list_datasets",
    "register_benchmark",
    "register_dataset",
]
