"""Image data: folders of images <-> tensors in [-1, 1], and the procedural "real" dataset."""
from .images import (
    IMAGE_EXTENSIONS,
    DataError,
    list_images,
    load_image,
    load_images,
    make_grid,
    save_grid,
    save_images,
    save_png,
    to_uint8,
)
from .procedural import make_procedural_dataset, procedural_images, resolve_data_root

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "list_images",
    "load_image",
    "load_images",
    "make_grid",
    "make_procedural_dataset",
    "procedural_images",
    "resolve_data_root",
    "save_grid",
    "save_images",
    "save_png",
    "to_uint8",
]
