"""The data layer: VTAB-1k lists, ImageFolder splits, layout dispatch, the transform and the folder helpers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import make_vit
from PIL import Image
from torch.utils.data import DataLoader
from vtab_folders import class_colour, make_imagefolder_task, make_vtab_task

from restune.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLIT_FOLDERS,
    VTAB_GROUP_NAMES,
    VTAB_GROUPS,
    VTAB_SPLITS,
    DatasetError,
    ImageFolderSplits,
    VtabFolder,
    build_transform,
    detect_layout,
    input_size,
    open_dataset,
    read_list,
)
from restune.features import check_deterministic, describe_transform

IN21K_CFG = {"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}


def write_list(task_dir: Path, split: str, lines: list[str]) -> Path:
    path = task_dir / f"{split}.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (12, 12), mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", size, colour)
    return image.convert(mode) if mode != "RGB" else image


@pytest.fixture
def vtab(tmp_path: Path) -> Path:
    make_vtab_task(tmp_path, "cifar", num_classes=3, sizes={"train800": 6, "val200": 3, "test": 6})
    return tmp_path


# --- VTAB-1k folder format ------------------------------------------------------------------------------------------


def test_vtab_splits_follow_their_lists(vtab: Path) -> None:
    task = vtab / "cifar"
    for split in VTAB_SPLITS:
        entries = read_list(task / f"{split}.txt")
        ds = VtabFolder(vtab, "cifar", split)
        assert len(ds) == len(entries)
        assert ds.targets == [e.label for e in entries]
        assert ds.samples == [(str(task / e.path), e.label) for e in entries]
        assert ds.items == [f"cifar/{e.path}" for e in entries]
        assert ds.num_classes == 3
    union = VtabFolder(vtab, "cifar", "train800val200")
    parts = VtabFolder(vtab, "cifar", "train800").items + VtabFolder(vtab, "cifar", "val200").items
    assert union.items == parts and len(union) == 9


def test_vtab_item_is_rgb_pil_without_transform_and_tensor_with(vtab: Path) -> None:
    image, label = VtabFolder(vtab, "cifar", "test")[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (16, 16)
    assert isinstance(label, int)
    tensor, _ = VtabFolder(vtab, "cifar", "test", build_transform(make_vit(), img_size=8))[0]
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_images_of_any_mode_are_converted_to_rgb(tmp_path: Path, mode: str) -> None:
    task = tmp_path / "t"
    task.mkdir()
    solid((200, 40, 10), mode=mode).save(task / ("a.jpg" if mode == "CMYK" else "a.png"))
    write_list(task, "test", [f"{'a.jpg' if mode == 'CMYK' else 'a.png'} 0"])
    image, _ = VtabFolder(tmp_path, "t", "test")[0]
    assert image.mode == "RGB"


def test_list_paths_may_point_anywhere_below_the_task_and_contain_spaces(tmp_path: Path) -> None:
    task = tmp_path / "t"
    (task / "deep" / "er dir").mkdir(parents=True)
    solid((1, 2, 3)).save(task / "deep" / "er dir" / "my image.png")
    solid((4, 5, 6)).save(task / "top.png")
    (task / "test.txt").write_text("deep/er dir/my image.png\t1\r\n\n   \ntop.png   0\r\n")
    ds = VtabFolder(tmp_path, "t", "test")
    assert ds.targets == [1, 0] and ds.num_classes == 2
    assert ds.items == ["t/deep/er dir/my image.png", "t/top.png"]
    assert ds.load_image(0).getpixel((0, 0)) == (1, 2, 3)


def test_class_count_is_inferred_over_all_lists_of_the_task(tmp_path: Path) -> None:
    task = tmp_path / "t"
    task.mkdir()
    solid((0, 0, 0)).save(task / "x.png")
    write_list(task, "train800", ["x.png 0", "x.png 1"])
    write_list(task, "test", ["x.png 6"])
    assert VtabFolder(tmp_path, "t", "train800").num_classes == 7
    assert VtabFolder(tmp_path, "t", "test").num_classes == 7
    assert VtabFolder(tmp_path, "t", "train800", num_classes=10).num_classes == 10
    with pytest.raises(DatasetError, match=r"test\.txt, line 1: label 6 is outside \[0, 5\) for num_classes=5"):
        VtabFolder(tmp_path, "t", "train800", num_classes=5)


def test_explicit_num_classes_is_checked_for_type_and_value(vtab: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        VtabFolder(vtab, "cifar", "test", num_classes=0)
    with pytest.raises(TypeError, match="must be an int"):
        VtabFolder(vtab, "cifar", "test", num_classes=3.0)  # type: ignore[arg-type]


def test_a_nonstandard_split_name_works_when_its_list_exists(vtab: Path) -> None:
    task = vtab / "cifar"
    (task / "mini.txt").write_text((task / "test.txt").read_text().splitlines(keepends=True)[0])
    ds = VtabFolder(vtab, "cifar", "mini")
    assert len(ds) == 1 and ds.num_classes == 3


def test_missing_image_names_list_line_path_count_and_fix(vtab: Path) -> None:
    (vtab / "cifar" / "images" / "test" / "00002.png").unlink()
    (vtab / "cifar" / "images" / "test" / "00004.png").unlink()
    with pytest.raises(FileNotFoundError) as info:
        VtabFolder(vtab, "cifar", "test")
    message = str(info.value)
    assert str(vtab / "cifar" / "test.txt") + ", line 3" in message
    assert "images/test/00002.png" in message
    assert "2 of 6 listed images are missing" in message
    assert "Re-extract" in message
    # other splits do not depend on the test images
    assert len(VtabFolder(vtab, "cifar", "train800")) == 6


def test_undecodable_image_raises_at_load_naming_file_list_and_line(vtab: Path) -> None:
    bad = vtab / "cifar" / "images" / "test" / "00001.png"
    bad.write_bytes(b"this is not a png")
    ds = VtabFolder(vtab, "cifar", "test")  # opening only checks existence
    ds[0]
    with pytest.raises(DatasetError) as info:
        ds[1]
    message = str(info.value)
    assert str(bad) in message and "test.txt, line 2" in message and "Replace" in message


def test_truncated_image_raises_dataset_error(vtab: Path) -> None:
    path = vtab / "cifar" / "images" / "test" / "00000.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DatasetError, match="cannot decode"):
        VtabFolder(vtab, "cifar", "test")[0]


def test_image_deleted_after_opening_raises_file_not_found(vtab: Path) -> None:
    ds = VtabFolder(vtab, "cifar", "test")
    (vtab / "cifar" / "images" / "test" / "00000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.txt, line 1\) existed when the dataset was opened"):
        ds[0]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("images/test/00000.png -1", r"line 2: label -1 is negative"),
        ("images/test/00000.png 1.0", r"line 2: label '1\.0' is not an integer"),
        ("images/test/00000.png cat", r"line 2: label 'cat' is not an integer"),
        ("images/test/00000.png 1_0", r"line 2: label '1_0' is not an integer"),
        ("images/test/00000.png", r"line 2: expected '<path> <label>'"),
        ("/abs/image.png 1", r"line 2: path '/abs/image\.png' is absolute"),
    ],
)
def test_malformed_lines_name_file_and_line(vtab: Path, line: str, match: str) -> None:
    write_list(vtab / "cifar", "test", ["images/test/00000.png 0", line])
    with pytest.raises(DatasetError, match=match) as info:
        VtabFolder(vtab, "cifar", "test")
    assert str(vtab / "cifar" / "test.txt") in str(info.value)


def test_malformed_line_in_another_list_of_the_task_is_reported(vtab: Path) -> None:
    write_list(vtab / "cifar", "val200", ["images/val200/00000.png zero"])
    with pytest.raises(DatasetError, match=r"val200\.txt, line 1: label 'zero'"):
        VtabFolder(vtab, "cifar", "train800")


def test_empty_and_non_utf8_lists_are_rejected(vtab: Path) -> None:
    (vtab / "cifar" / "test.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="lists no images"):
        VtabFolder(vtab, "cifar", "test")
    (vtab / "cifar" / "test.txt").write_bytes(b"images/test/\xff.png 0\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        VtabFolder(vtab, "cifar", "test")


def test_missing_split_list_and_task_folder(vtab: Path) -> None:
    (vtab / "cifar" / "val200.txt").unlink()
    with pytest.raises(FileNotFoundError) as info:
        VtabFolder(vtab, "cifar", "val200")
    message = str(info.value)
    assert "val200.txt" in message and "lists present: test.txt, train800.txt, train800val200.txt" in message
    with pytest.raises(FileNotFoundError, match="VTAB task folder .*dtd does not exist"):
        VtabFolder(vtab, "dtd", "test")


def test_vtab_groups_table() -> None:
    assert len(VTAB_GROUPS) == 19
    counts = {g: sum(1 for info in VTAB_GROUPS.values() if info.group == g) for g in VTAB_GROUP_NAMES}
    assert counts == {"Natural": 7, "Specialized": 4, "Structured": 8}
    assert sum(info.num_classes for info in VTAB_GROUPS.values()) == 940
    assert VTAB_GROUPS["cifar"] == ("Natural", 100, 10_000)
    assert VTAB_GROUPS["diabetic_retinopathy"].num_classes == 5
    assert VTAB_GROUPS["smallnorb_ele"].group == "Structured"
    assert list(VTAB_GROUPS)[:2] == ["cifar", "caltech101"] and list(VTAB_GROUPS)[-1] == "smallnorb_ele"


# --- ImageFolder splits ---------------------------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    make_imagefolder_task(tmp_path, "cub", num_classes=3, sizes={"train": 6, "val": 3, "test": 3})
    return tmp_path


def test_imagefolder_classes_sorted_and_split_names_mapped(folders: Path) -> None:
    train = ImageFolderSplits(folders, "cub", "train800")
    assert train.classes == ["class_0", "class_1", "class_2"] and train.num_classes == 3
    assert train.class_to_idx == {"class_0": 0, "class_1": 1, "class_2": 2}
    assert all(item.startswith("cub/train/") for item in train.items)
    assert all(f"/class_{label}/" in path for path, label in train.samples)
    assert train.targets == sorted(train.targets)  # grouped by class, in class order
    val = ImageFolderSplits(folders, "cub", "val200")
    both = ImageFolderSplits(folders, "cub", "train800val200")
    assert both.items == train.items + val.items
    for vtab_name, literal in [("train800", "train"), ("val200", "val"), ("test", "test")]:
        assert ImageFolderSplits(folders, "cub", vtab_name).items == ImageFolderSplits(folders, "cub", literal).items
    for union in ("trainval", "train+val"):
        assert ImageFolderSplits(folders, "cub", union).items == both.items
    assert SPLIT_FOLDERS["train800val200"] == ("train", "val")
    image, label = ImageFolderSplits(folders, "cub", "test", build_transform(IN21K_CFG, img_size=(8, 6)))[0]
    assert image.shape == (3, 8, 6) and label == 0


def test_imagefolder_class_names_sort_as_strings(tmp_path: Path) -> None:
    for name in ["b", "a", "B", "10", "9"]:
        (tmp_path / "t" / "train" / name).mkdir(parents=True)
        solid((0, 0, 0)).save(tmp_path / "t" / "train" / name / "x.jpg")
    assert ImageFolderSplits(tmp_path, "t", "train").classes == ["10", "9", "B", "a", "b"]


def test_imagefolder_ignores_non_images_and_hidden_entries_and_reads_subfolders(folders: Path) -> None:
    class_dir = folders / "cub" / "train" / "class_1"
    (class_dir / "notes.txt").write_text("not an image")
    (class_dir / ".hidden.png").write_bytes(b"")
    (class_dir / "sub").mkdir()
    solid((1, 1, 1)).save(class_dir / "sub" / "z.PNG")
    (folders / "cub" / "train" / ".ipynb_checkpoints").mkdir()
    ds = ImageFolderSplits(folders, "cub", "train")
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert "cub/train/class_1/sub/z.PNG" in ds.items
    assert not any(item.endswith((".txt", ".hidden.png")) for item in ds.items)
    assert len(ds) == 7


@pytest.mark.parametrize("other", ["val", "test"])
def test_mismatched_class_sets_name_the_classes(folders: Path, other: str) -> None:
    (folders / "cub" / other / "class_9").mkdir()
    (folders / "cub" / other / "class_0").rename(folders / "cub" / other / "class_00")
    with pytest.raises(DatasetError) as info:
        ImageFolderSplits(folders, "cub", "train800")
    message = str(info.value)
    assert str(folders / "cub" / other) in message
    assert "missing 1 class folder(s) of train/: 'class_0'" in message
    assert "2 class folder(s) not in train/: 'class_00', 'class_9'" in message
    assert "same class folders" in message


def test_missing_val_folder_and_missing_train_folder(tmp_path: Path) -> None:
    make_imagefolder_task(tmp_path, "dogs", sizes={"train": 3, "val": 0, "test": 3})
    assert len(ImageFolderSplits(tmp_path, "dogs", "test")) == 3
    for split in ("val200", "train800val200"):
        with pytest.raises(FileNotFoundError, match=r"needs .*val, which does not exist .*present: 'train', 'test'"):
            ImageFolderSplits(tmp_path, "dogs", split)
    (tmp_path / "notrain" / "test" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"notrain/train does not exist.*Found in .*: 'test'"):
        ImageFolderSplits(tmp_path, "notrain", "test")


def test_imagefolder_empty_train_class_and_unknown_split(folders: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'train900'.*train800, val200"):
        ImageFolderSplits(folders, "cub", "train900")
    for path in (folders / "cub" / "train" / "class_2").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="class_2 has no images"):
        ImageFolderSplits(folders, "cub", "train")
    for path in (folders / "cub" / "test" / "class_2").iterdir():
        path.unlink()  # an empty class folder is fine outside train/
    (folders / "cub" / "train" / "class_2" / "x.png").write_bytes(b"garbage")
    ds = ImageFolderSplits(folders, "cub", "test")
    assert set(ds.targets) == {0, 1}
    train = ImageFolderSplits(folders, "cub", "train")
    with pytest.raises(DatasetError, match=r"cannot decode image .*class_2/x\.png"):
        train[len(train) - 1]


# --- layout dispatch ------------------------------------------------------------------------------------------------


def test_open_dataset_dispatches_on_layout(vtab: Path) -> None:
    make_imagefolder_task(vtab, "cub")
    assert detect_layout(vtab, "cifar") == "vtab" and detect_layout(vtab, "cub") == "imagefolder"
    assert isinstance(open_dataset(vtab, "cifar", "test"), VtabFolder)
    cub = open_dataset(vtab, "cub", "train800val200")
    assert isinstance(cub, ImageFolderSplits) and len(cub) == 18
    assert open_dataset(vtab, "cifar", "test", num_classes=5).num_classes == 5
    with pytest.raises(DatasetError, match="has 3 class folders but num_classes=4"):
        open_dataset(vtab, "cub", "test", num_classes=4)
    make_imagefolder_task(vtab, "cifar")  # both layouts: the lists win
    assert isinstance(open_dataset(vtab, "cifar", "test"), VtabFolder)


def test_open_dataset_unknown_layout_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "odd" / "images").mkdir(parents=True)
    (tmp_path / "odd" / "labels.csv").write_text("a,1\n")
    with pytest.raises(DatasetError) as info:
        open_dataset(tmp_path, "odd", "train800")
    message = str(info.value)
    assert "train800.txt" in message and "train/<class>/" in message and "images/, labels.csv" in message
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*missing does not exist; .* holds: odd/"):
        open_dataset(tmp_path, "missing", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="folder is empty"):
        open_dataset(tmp_path, "empty", "test")


def test_datasets_batch_through_a_dataloader_and_pickle(vtab: Path) -> None:
    ds = open_dataset(vtab, "cifar", "train800", build_transform(make_vit()))
    images, labels = next(iter(DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    copy = pickle.loads(pickle.dumps(ds))  # what worker processes receive
    assert torch.equal(copy[3][0], ds[3][0]) and copy.items == ds.items


# --- the transform --------------------------------------------------------------------------------------------------


def test_transform_sizes_from_the_model() -> None:
    assert input_size(make_vit()) == (32, 32)  # no pretrained_cfg: the patch embedding knows
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=1, embed_dim=16, num_heads=1)
    assert small.pretrained_cfg["input_size"] == (3, 224, 224)
    assert input_size(small) == (48, 48)  # timm keeps 224 in the config; the real size wins
    assert input_size(IN21K_CFG) == (224, 224)
    assert input_size("vit_base_patch16_224.orig_in21k") == (224, 224)
    assert input_size({"input_size": (3, 40, 30)}) == (40, 30)
    wrapper = torch.nn.Module()
    wrapper.backbone = make_vit()
    assert input_size(wrapper) == (32, 32)


@pytest.mark.parametrize(
    ("cfg", "normalization", "mean", "std"),
    [
        (IN21K_CFG, "model", (0.5,) * 3, (0.5,) * 3),
        ("vit_base_patch16_224.orig_in21k", "model", (0.5,) * 3, (0.5,) * 3),
        ({"input_size": (3, 8, 8), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}, "model", (0.1, 0.2, 0.3), None),
        (IN21K_CFG, "imagenet", IMAGENET_MEAN, IMAGENET_STD),
        (IN21K_CFG, "none", (0.0,) * 3, (1.0,) * 3),
    ],
)
def test_transform_normalisation_values(cfg: object, normalization: str, mean: tuple, std: tuple | None) -> None:
    std = std or (0.4, 0.5, 0.6)
    colour = (255, 128, 0)
    out = build_transform(cfg, normalization=normalization, img_size=4)(solid(colour))  # type: ignore[arg-type]
    expected = (torch.tensor(colour) / 255.0 - torch.tensor(mean)) / torch.tensor(std)
    assert out.shape == (3, 4, 4)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 4, 4).float(), atol=1e-6, rtol=0)


def test_model_normalisation_of_a_model_without_config_is_timms_default() -> None:
    steps = build_transform(make_vit()).transforms
    assert steps[-1].mean == IMAGENET_MEAN and steps[-1].std == IMAGENET_STD
    in21k = timm.create_model(
        "vit_base_patch16_224.orig_in21k", pretrained=False, img_size=16, depth=1, embed_dim=16, num_heads=1
    )
    assert build_transform(in21k).transforms[-1].mean == (0.5, 0.5, 0.5)


def test_transform_resizes_directly_without_crop_and_bicubic() -> None:
    # left half red, right half blue, twice as wide as high: a centre crop would lose both edges' colours
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    transform = build_transform(IN21K_CFG, normalization="none", img_size=10)
    out = transform(Image.fromarray(pixels))
    assert out.shape == (3, 10, 10)
    assert out[0, :, 0].min() > 0.99 and out[2, :, -1].min() > 0.99
    resize = transform.transforms[0]
    assert resize.interpolation.value == "bicubic" and resize.size == (10, 10)
    assert [type(t).__name__ for t in transform.transforms] == ["Resize", "ToTensor"]


def test_transform_is_deterministic_for_feature_caches_and_validates_arguments() -> None:
    transform = build_transform(make_vit())
    check_deterministic(transform)
    assert describe_transform(transform) == describe_transform(build_transform(make_vit()))
    with pytest.raises(ValueError, match="normalization must be one of model, imagenet, none"):
        build_transform(IN21K_CFG, normalization="inception")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timm has no pretrained config named 'no_such_model'"):
        build_transform("no_such_model")
    with pytest.raises(TypeError, match="expected a model"):
        build_transform(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be positive"):
        build_transform(IN21K_CFG, img_size=0)


# --- the folder helpers ---------------------------------------------------------------------------------------------


def test_helpers_are_deterministic_in_the_seed(tmp_path: Path) -> None:
    def snapshot(task_dir: Path) -> dict[str, bytes]:
        return {p.relative_to(task_dir).as_posix(): p.read_bytes() for p in sorted(task_dir.rglob("*")) if p.is_file()}

    a = snapshot(make_vtab_task(tmp_path / "a", "t", seed=1))
    b = snapshot(make_vtab_task(tmp_path / "b", "t", seed=1))
    c = snapshot(make_vtab_task(tmp_path / "c", "t", seed=2))
    assert a == b and a != c
    assert snapshot(make_imagefolder_task(tmp_path / "a", "f", seed=1)) == snapshot(
        make_imagefolder_task(tmp_path / "b", "f", seed=1)
    )


def test_helper_layouts(tmp_path: Path) -> None:
    task = make_vtab_task(tmp_path, "t", num_classes=4, sizes={"train800": 8, "val200": 4, "test": 0})
    assert task == tmp_path / "t"
    assert sorted(p.name for p in task.glob("*.txt")) == ["train800.txt", "train800val200.txt", "val200.txt"]
    text = (task / "train800val200.txt").read_text()
    assert text == (task / "train800.txt").read_text() + (task / "val200.txt").read_text()
    assert sorted(VtabFolder(tmp_path, "t", "train800").targets) == [0, 0, 1, 1, 2, 2, 3, 3]
    folder = make_imagefolder_task(tmp_path, "f", num_classes=12, sizes={"train": 12, "test": 0})
    assert sorted(p.name for p in folder.iterdir()) == ["train", "val"]
    assert len(ImageFolderSplits(tmp_path, "f", "val")) == 24
    assert ImageFolderSplits(tmp_path, "f", "train").classes == [f"class_{k:02d}" for k in range(12)]
    jpg = make_vtab_task(tmp_path, "j", image_format="jpg")
    assert VtabFolder(tmp_path, "j", "test").load_image(0).size == (16, 16) and (jpg / "images/test/00000.jpg").exists()
    with pytest.raises(ValueError, match="unknown split"):
        make_vtab_task(tmp_path, "x", sizes={"train": 3})


@pytest.mark.parametrize("maker", [make_vtab_task, make_imagefolder_task])
def test_helper_classes_are_learnable_from_mean_colour(tmp_path: Path, maker: object) -> None:
    num_classes = 10
    maker(tmp_path, "t", num_classes=num_classes)  # type: ignore[operator]
    train = open_dataset(tmp_path, "t", "train800", build_transform(IN21K_CFG, normalization="none", img_size=8))
    test = open_dataset(tmp_path, "t", "test", build_transform(IN21K_CFG, normalization="none", img_size=8))
    features = torch.stack([image.mean((1, 2)) for image, _ in train])
    labels = torch.tensor(train.targets)
    centroids = torch.stack([features[labels == k].mean(0) for k in range(num_classes)])
    correct = sum(int(torch.cdist(image.mean((1, 2))[None], centroids).argmin()) == label for image, label in test)
    assert correct == len(test)
    assert torch.allclose(centroids[3] * 255, torch.tensor(class_colour(3, num_classes)).float(), atol=10)
