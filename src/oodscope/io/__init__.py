"""Image and dataset input: robust decoding to RGB, dataset sources, and offline real-data readers."""

from .anomaly import AnomalySource, AnomalySplit, MaskError, anomaly_folder, load_mask, mvtec_category, visa_split
from .files import FileList, FlatFolder, ImageFolder, open_dataset
from .images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    decode_image,
    load_image,
    read_image_bytes,
    to_rgb,
)
from .realdata import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ID_CLASSES,
    FASHION_MNIST_NEAR_OOD_CLASSES,
    TEXTILE_CLASSES,
    FashionMnistOOD,
    digits,
    fashion_mnist,
    fashion_mnist_ood,
    sanitize_class_name,
    textiles,
    write_image_folder,
)
from .resolve import describe_source, resolve_images
from .sources import ArrayDataset, Concat, DatasetError, ImageSource, Relabel, Subset

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ID_CLASSES",
    "FASHION_MNIST_NEAR_OOD_CLASSES",
    "IMAGE_EXTENSIONS",
    "TEXTILE_CLASSES",
    "AnomalySource",
    "AnomalySplit",
    "ArrayDataset",
    "Concat",
    "DatasetError",
    "FashionMnistOOD",
    "FileList",
    "FlatFolder",
    "ImageFolder",
    "ImageLoadError",
    "ImageSource",
    "MaskError",
    "Relabel",
    "Subset",
    "anomaly_folder",
    "decode_image",
    "describe_source",
    "resolve_images",
    "digits",
    "fashion_mnist",
    "fashion_mnist_ood",
    "load_image",
    "load_mask",
    "mvtec_category",
    "open_dataset",
    "read_image_bytes",
    "sanitize_class_name",
    "textiles",
    "to_rgb",
    "visa_split",
    "write_image_folder",
]
