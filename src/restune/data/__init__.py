"""Datasets and the input transform of the training harness (docs/methods/README.md: data and protocols).

- ``VtabFolder``: VTAB-1k in the shared ``<task>/<split>.txt`` + images format; ``VTAB_GROUPS`` for group means.
- ``ImageFolderSplits``: FGVC and other ``<task>/{train,val,test}/<class>/`` trees, with VTAB split names mapped on.
- ``open_dataset``: whichever of the two a folder holds.
- ``build_transform``: bicubic resize to the model's input size, to tensor, the recipe's normalisation.

Both datasets return ``(transform(rgb_pil_image), int_label)`` and carry ``num_classes``, ``samples``, ``targets``
and ``items`` (stable identifiers for feature caches). Malformed data raises ``DatasetError`` (a ``ValueError``),
missing data ``FileNotFoundError``; both name the file (and list line) and the fix.
"""

from restune.data.base import IMAGE_EXTENSIONS, DatasetError, ImageListDataset
from restune.data.imagefolder import SPLIT_FOLDERS, ImageFolderSplits
from restune.data.layout import detect_layout, open_dataset
from restune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS, build_transform, input_size
from restune.data.vtab import VTAB_GROUP_NAMES, VTAB_GROUPS, VTAB_SPLITS, ListEntry, VtabFolder, VtabTaskInfo, read_list

__all__ = [
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "ImageListDataset",
    "VtabFolder",
    "VtabTaskInfo",
    "VTAB_GROUPS",
    "VTAB_GROUP_NAMES",
    "VTAB_SPLITS",
    "ListEntry",
    "read_list",
    "ImageFolderSplits",
    "SPLIT_FOLDERS",
    "open_dataset",
    "detect_layout",
    "build_transform",
    "input_size",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
]
