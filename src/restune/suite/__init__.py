"""An offline VTAB-1k-style evaluation suite, generated from a seed and written in the VTAB-1k folder format.

The suite is for backbones pretrained on procedurally generated images (the shipped one on random fractal and
random-wave texture categories), where the real VTAB-1k is unavailable or too slow to fetch: eight small tasks, two per
natural/specialized group and four structured, none of whose labels is a pretraining category. ``write_suite(root)``
writes (or finds) every task as ``<root>/<task>/{train800,val200,train800val200,test}.txt`` plus PNG images,
byte-identical for a given seed.

Tasks (group, classes, what the label is):

- ``digits`` (natural, 10): a real handwritten digit from scikit-learn's bundled scans, recoloured and jittered.
- ``textures`` (natural, 8): a texture family (stripes coarse/fine, checks, dots, blotches, rings, waves, grain).
- ``cells`` (specialized, 4): which abnormality (none, elongated, lobed, nucleated) shows among stained cells.
- ``remote`` (specialized, 5): an overhead scene layout (fields, forest, residential, river, highway).
- ``count`` (structured, 6): how many objects (1-6, label = count - 1), CLEVR-count-like.
- ``location`` (structured, 8): the x-position bin of one object, dSprites-location-like.
- ``orientation`` (structured, 16): the angle bin (mod 180 degrees) of a bar or ellipse, dSprites-orientation-like.
- ``distance`` (structured, 5): the distance bin of the nearest object on a ground plane, KITTI-distance-like.
"""

from restune.suite.tasks import SUITE_GROUPS, TASKS, Task, balanced_labels, digit_data, digit_sources
from restune.suite.writer import (
    IMAGE_SPLITS,
    LIST_SPLITS,
    MANIFEST,
    image_rng,
    is_complete,
    read_manifest,
    read_split,
    split_sizes,
    write_suite,
    write_task,
)

__all__ = [
    "TASKS",
    "SUITE_GROUPS",
    "Task",
    "write_suite",
    "write_task",
    "is_complete",
    "read_split",
    "read_manifest",
    "image_rng",
    "split_sizes",
    "balanced_labels",
    "digit_data",
    "digit_sources",
    "IMAGE_SPLITS",
    "LIST_SPLITS",
    "MANIFEST",
]
