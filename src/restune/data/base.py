"""The part every image dataset of the harness shares: an ordered list of (image file, label) read with PIL as RGB."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

__all__ = ["DatasetError", "IMAGE_EXTENSIONS", "ImageListDataset"]

#: File name endings (lower case) treated as images when a folder tree is scanned. List files are not filtered.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """Data on disk that cannot be used as it is; the message names the file (and line) and says how to fix it.

    Raised for a bad list line or label, mismatched class folders, an unknown layout or an undecodable image.

    Missing files and folders raise ``FileNotFoundError`` instead, with the same kind of message.
    """


class ImageListDataset(Dataset[tuple[Any, int]]):
    """An ordered list of images with integer labels; ``dataset[i]`` is ``(transform(image), label)``.

    The list is fixed at construction so that the order (which feature caches and seeded loaders rely on) never
    depends on the file system. Images are decoded only when an item is read, so opening a 70k-image split is cheap.

    Attributes:
        samples: ``(absolute image path, label)`` per item, in order.
        targets: the labels alone (torchvision's attribute name, used by samplers).
        items: a stable identifier per item, ``<task>/<path below the task folder>``, for caches and logs.
        num_classes: the number of classes of the task, which may exceed the labels present in this split.
        transform: applied to the PIL RGB image; ``None`` returns the image itself.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        items: list[str],
        num_classes: int,
        transform: Callable[[Image.Image], Any] | None,
    ) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.items = items
        self.num_classes = num_classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def origin(self, index: int) -> str:
        """Where item ``index`` was declared, for error messages (a list file and line, or empty)."""
        return ""

    def load_image(self, index: int) -> Image.Image:
        """Decode item ``index`` as an RGB PIL image; errors name the file and where it was listed."""
        path = self.samples[index][0]
        origin = self.origin(index)
        where = f" (listed at {origin})" if origin else ""
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"image {path}{where} existed when the dataset was opened but is gone now; restore it and reopen the "
                "dataset"
            ) from error
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise DatasetError(
                f"cannot decode image {path}{where}: {error}. Replace it with a valid image file (re-extract the "
                "dataset archive) or remove it from the split"
            ) from error

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index][1]

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self._repr_fields().items())
        return f"{type(self).__name__}({fields}, len={len(self)}, num_classes={self.num_classes})"

    def _repr_fields(self) -> dict[str, Any]:
        return {}
