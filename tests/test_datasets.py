"""The six datasets beside CIFAR-100: each synthetic writer's files in the real on-disk layout (torchvision's own
classes read them), open_dataset's items, labels and subsets, the integrity checks, the folder dataset's layout
problems, the transforms, the device loader's flip switch and create_dataset's --dataset. CPU only; nothing is
downloaded."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from conftest import run_main
from PIL import Image
from torchvision import transforms

import create_dataset
from create_dataset import (
    CUB200,
    DATASETS,
    FOOD101_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN,
    NUM_CLASSES,
    PET_BREEDS,
    SMALL_IMAGE_DATASETS,
    STD,
    SYNTHETIC_FOLDER_CLASSES,
    SYNTHETIC_MARKERS,
    TEST_TRANSFORM,
    TRAIN_TRANSFORM,
    DatasetProblem,
    DeviceLoader,
    augment_on_device,
    crop_flip_indices,
    dataset_classes,
    dataset_folder,
    dataset_transforms,
    is_synthetic,
    make_synthetic,
    open_dataset,
)

OTHERS = [name for name in DATASETS if name != "cifar100"]
LARGE = [name for name in DATASETS if name not in SMALL_IMAGE_DATASETS]
CLASSES = {**NUM_CLASSES, "folder": len(SYNTHETIC_FOLDER_CLASSES)}
# (train, test) images written per dataset: every class in train, a few dozen images where the classes allow.
SIZES = {"cifar10": (60, 30), "svhn": (60, 30), "oxford-pet": (74, 37), "food101": (101, 40), "cub200": (200, 40)}
SIZES |= {"fashion-mnist": (60, 30), "mnist": (60, 30)}
SIZES["folder"] = (30, 15)
IMAGE_SIZE = {name: 32 if name in SMALL_IMAGE_DATASETS else 40 for name in DATASETS}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """One synthetic dataset of each kind, written once for the module (tests that change files copy it)."""
    base = tmp_path_factory.mktemp("datasets")
    return {name: make_synthetic(name, base / name, *SIZES[name], seed=0) for name in OTHERS}


def _copy(roots: dict[str, Path], name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(roots[name], root)
    return root


def _open(name: str, root: Path, train: bool, download: bool = False):
    train_transform, test_transform = dataset_transforms(name, IMAGE_SIZE[name])
    return open_dataset(name, root, train, train_transform if train else test_transform, download)


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


# --------------------------------------------------------------------------- items, labels, subsets


@pytest.mark.parametrize("name", OTHERS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_open_dataset_gives_images_and_one_label(roots, name, train):
    dataset = _open(name, roots[name], train)
    n = SIZES[name][0 if train else 1]
    assert len(dataset) == n
    labels = dataset.labels
    assert labels.dtype == torch.int64 and labels.shape == (n, 1)
    assert 0 <= int(labels.min()) and int(labels.max()) < CLASSES[name]
    if train:  # classes cycle: every class is there once n_train reaches the class count
        assert set(labels[:, 0].tolist()) == set(range(CLASSES[name]))
    for i in (0, n - 1):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, IMAGE_SIZE[name], IMAGE_SIZE[name])
        assert label.dtype == torch.int64 and label.shape == (1,) and torch.equal(label, labels[i])
    assert is_synthetic(name, roots[name]) and dataset_classes(name, roots[name]) == CLASSES[name]
    if name in SMALL_IMAGE_DATASETS:  # what DeviceLoader reads
        assert dataset.data.dtype == np.uint8 and dataset.data.shape == (n, 32, 32, 3)


@pytest.mark.parametrize("name", OTHERS)
def test_subset_holds_the_given_items_in_order(roots, name):
    dataset = _open(name, roots[name], True)
    train_transform, test_transform = dataset.transform, dataset_transforms(name, IMAGE_SIZE[name])[1]
    part = dataset.subset([5, 0, 17], transform=test_transform)
    assert type(part) is type(dataset) and len(part) == 3 and len(dataset) == SIZES[name][0]
    assert part.transform is test_transform and dataset.transform is train_transform
    assert torch.equal(part.labels, dataset.labels[[5, 0, 17]])
    torch.testing.assert_close(part[1][0], test_transform(_raw(dataset, 0)))
    assert dataset.subset(np.array([2])).transform is train_transform  # None keeps the current one
    if name in SMALL_IMAGE_DATASETS:
        assert np.array_equal(part.data, dataset.data[[5, 0, 17]])


def _raw(dataset, index: int) -> Image.Image:
    """Item `index` of `dataset` as the PIL image its transform receives."""
    kept, dataset.transform = dataset.transform, None
    try:
        image, _ = dataset[index]
    finally:
        dataset.transform = kept
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    return image


def test_cifar100_has_subset_too(tmp_path):
    root = make_synthetic("cifar100", tmp_path / "c", n_train=40, n_test=10)
    dataset = open_dataset("cifar100", root, True, TRAIN_TRANSFORM, False)
    part = dataset.subset([7, 3], transform=TEST_TRANSFORM)
    assert type(part) is create_dataset.CIFAR100 and part.transform is TEST_TRANSFORM
    assert torch.equal(part.labels, dataset.labels[[7, 3]]) and part.labels.shape == (2, 4)
    assert np.array_equal(part.data, dataset.data[[7, 3]]) and part.targets == [dataset.targets[i] for i in (7, 3)]
    assert is_synthetic("cifar100", root) and dataset_classes("cifar100", root) == 100


@pytest.mark.parametrize("name", ["cifar10", "svhn", "oxford-pet"])
def test_synthetic_images_are_learnable(roots, name):
    """Nearest class mean on 16x16 test-transformed images, fitted on train: far above chance."""
    features = {}
    for train in (True, False):
        dataset = open_dataset(name, roots[name], train, dataset_transforms(name, 16)[1], False)
        features[train] = torch.stack([dataset[i][0].flatten() for i in range(len(dataset))]), dataset.labels[:, 0]
    (x, y), (x_test, y_test) = features[True], features[False]
    means = torch.stack([x[y == k].mean(0) for k in range(CLASSES[name])])
    accuracy = float((torch.cdist(x_test, means).argmin(1) == y_test).float().mean())
    assert accuracy > 0.5, accuracy


def test_make_synthetic_is_deterministic_per_seed(tmp_path):
    for name in ("cifar10", "food101"):
        a, b, c = (make_synthetic(name, tmp_path / f"{name}{k}", 20, 10, seed=s) for k, s in enumerate((3, 3, 4)))
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
        assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if (c / f).is_file())


# --------------------------------------------------------------------------- the real on-disk layouts


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_cifar10_files_are_cifar10s_pickles_and_torchvision_reads_them(roots, monkeypatch):
    root = roots["cifar10"]
    folder = root / "cifar-10-batches-py"
    md5 = json.loads((root / "cifar-10-batches-py.synthetic.json").read_text())
    assert sorted(md5) == sorted([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch", "batches.meta"])
    assert all(digest == create_dataset._md5(folder / name) for name, digest in md5.items())
    batch = _load_pickle(folder / "data_batch_1")
    assert set(batch) == {"batch_label", "labels", "data", "filenames"}
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (12, 3072)
    assert _load_pickle(folder / "batches.meta")["label_names"][:2] == ["airplane", "automobile"]
    # torchvision's own class, with the marker's md5s in place of the real archive's.
    tv = torchvision.datasets.CIFAR10
    monkeypatch.setattr(tv, "train_list", [[f"data_batch_{k}", md5[f"data_batch_{k}"]] for k in range(1, 6)])
    monkeypatch.setattr(tv, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tv, "meta", {**tv.meta, "md5": md5["batches.meta"]})
    for train in (True, False):
        ours, theirs = open_dataset("cifar10", root, train, None, False), tv(root, train=train)
        assert ours.labels[:, 0].tolist() == theirs.targets and np.array_equal(ours.data, theirs.data)


def test_svhn_files_are_svhns_mat_files_and_torchvision_reads_them(roots, monkeypatch):
    root = roots["svhn"]
    md5 = json.loads((root / "svhn.synthetic.json").read_text())
    mat = scipy.io.loadmat(root / "svhn" / "train_32x32.mat")
    assert mat["X"].dtype == np.uint8 and mat["X"].shape == (32, 32, 3, 60)
    assert mat["y"].shape == (60, 1) and set(mat["y"][:, 0].tolist()) == set(range(1, 11))  # 10 is the digit 0
    split_list = {k: list(v) for k, v in torchvision.datasets.SVHN.split_list.items()}
    for split, filename in (("train", "train_32x32.mat"), ("test", "test_32x32.mat")):
        split_list[split][2] = md5[filename]
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", split_list)
    for train, split in ((True, "train"), (False, "test")):
        ours, theirs = open_dataset("svhn", root, train, None, False), torchvision.datasets.SVHN(root / "svhn", split)
        assert ours.labels[:, 0].tolist() == theirs.labels.tolist()
        assert np.array_equal(ours.data, theirs.data.transpose(0, 2, 3, 1))  # NHWC, as CIFAR's
        assert np.array_equal(np.asarray(_raw(ours, 4)), np.asarray(theirs[4][0]))
    digits = np.where(mat["y"][:, 0] == 10, 0, mat["y"][:, 0])
    assert open_dataset("svhn", root, True, None, False).labels[:, 0].tolist() == digits.tolist()


def test_pet_files_are_the_pet_archives_and_torchvision_reads_them(roots):
    folder = roots["oxford-pet"] / "oxford-iiit-pet"
    lines = (folder / "annotations" / "trainval.txt").read_text().splitlines()
    assert len(lines) == 74
    for line in lines:
        image, class_id, species, breed_id = re.fullmatch(r"(\w+)_(\d+) (\d+) ([12]) (\d+)", line).group(1, 3, 4, 5)
        assert PET_BREEDS[int(class_id) - 1] == image and species == ("1" if image[0].isupper() else "2")
        assert 1 <= int(breed_id) <= (12 if species == "1" else 25)
    assert (folder / "images" / "Abyssinian_1.jpg").is_file()
    assert (folder / "images" / "yorkshire_terrier_3.jpg").is_file()
    for train, split in ((True, "trainval"), (False, "test")):
        theirs = torchvision.datasets.OxfordIIITPet(roots["oxford-pet"], split=split)
        assert open_dataset("oxford-pet", roots["oxford-pet"], train, None, False).labels[:, 0].tolist() == [
            theirs[i][1] for i in range(len(theirs))
        ]
    assert theirs.classes[:2] == ["Abyssinian", "American Bulldog"] and len(theirs.classes) == 37


def test_food101_files_are_food101s_and_torchvision_reads_them(roots):
    folder = roots["food101"] / "food-101"
    train = json.loads((folder / "meta" / "train.json").read_text())
    assert list(train) == FOOD101_CLASSES and len(train) == 101  # every class is a key, as in the real file
    assert (folder / "meta" / "classes.txt").read_text().split() == FOOD101_CLASSES
    assert all((folder / "images" / f"{path}.jpg").is_file() for paths in train.values() for path in paths)
    for train_, split in ((True, "train"), (False, "test")):
        theirs = torchvision.datasets.Food101(roots["food101"], split=split)
        assert theirs.classes == FOOD101_CLASSES
        ours = open_dataset("food101", roots["food101"], train_, None, False)
        assert ours.labels[:, 0].tolist() == theirs._labels


def test_cub200_files_are_the_official_layout(roots):
    folder = roots["cub200"] / "CUB_200_2011"

    def table(name: str) -> dict[int, str]:
        return {int(k): v for k, v in (line.split() for line in (folder / name).read_text().splitlines())}

    paths, classes, split = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    assert sorted(paths) == sorted(classes) == sorted(split) == list(range(1, 241))
    assert table("classes.txt")[1] == "001.Synthetic_Bird_001" and len(table("classes.txt")) == 200
    for image_id, path in paths.items():
        assert path.startswith(f"{int(classes[image_id]):03d}.") and (folder / "images" / path).is_file()
    assert sum(v == "1" for v in split.values()) == 200 and set(split.values()) == {"0", "1"}
    dataset = open_dataset("cub200", roots["cub200"], True, None, False)
    assert dataset.classes[0] == "Synthetic_Bird_001"
    assert dataset.labels[:, 0].tolist() == [int(classes[i]) - 1 for i in sorted(paths) if split[i] == "1"]


def test_folder_files_are_class_folders_torchvision_reads(roots):
    for split, n in (("train", 30), ("test", 15)):
        theirs = torchvision.datasets.ImageFolder(roots["folder"] / split)
        assert theirs.classes == list(SYNTHETIC_FOLDER_CLASSES) and len(theirs) == n
        ours = open_dataset("folder", roots["folder"], split == "train", None, False)
        assert ours.labels[:, 0].tolist() == theirs.targets and ours.classes == theirs.classes
    assert (roots["folder"] / "synthetic.json").is_file()


@pytest.mark.parametrize("name", LARGE)
def test_large_images_are_small_jpegs_of_varying_non_square_sizes(roots, name):
    suffix, image_format = (".png", "PNG") if name == "folder" else (".jpg", "JPEG")
    files = sorted(dataset_folder(name, roots[name]).rglob(f"*{suffix}"))
    assert len(files) == sum(SIZES[name])
    sizes = set()
    for path in files[:20]:
        with Image.open(path) as image:
            assert image.format == image_format and image.mode == "RGB"
            assert image.width != image.height and max(image.size) <= 64
            sizes.add(image.size)
    assert len(sizes) > 5


def test_dataset_folder_and_markers(tmp_path):
    folders = {
        "cifar100": "cifar-100-python",
        "cifar10": "cifar-10-batches-py",
        "svhn": "svhn",
        "oxford-pet": "oxford-iiit-pet",
        "food101": "food-101",
        "cub200": "CUB_200_2011",
    }
    for name, folder in folders.items():
        assert dataset_folder(name, tmp_path) == tmp_path / folder
        assert SYNTHETIC_MARKERS[name] == f"{folder}.synthetic.json" and not is_synthetic(name, tmp_path)
    assert dataset_folder("folder", tmp_path) == tmp_path and not is_synthetic("folder", tmp_path)
    for function in (dataset_folder, is_synthetic, dataset_classes):
        with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
            function("imagenet", tmp_path)


# --------------------------------------------------------------------------- integrity checks, no downloads


@pytest.mark.parametrize("name", OTHERS)
def test_a_missing_dataset_is_not_found(tmp_path, name):
    for train in (True, False):
        with pytest.raises(RuntimeError, match="not found"):
            _open(name, tmp_path / "empty", train)


@pytest.mark.parametrize("file", ["data_batch_3", "test_batch", "batches.meta"])
def test_cifar10_a_changed_byte_fails_the_md5(roots, tmp_path, file):
    root = _copy(roots, "cifar10", tmp_path)
    _flip_a_byte(root / "cifar-10-batches-py" / file)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        _open("cifar10", root, train=True)


def test_svhn_a_changed_byte_fails_the_md5(roots, tmp_path):
    root = _copy(roots, "svhn", tmp_path)
    _flip_a_byte(root / "svhn" / "test_32x32.mat")
    assert len(_open("svhn", root, train=True)) == 60  # each split checks its own file
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        _open("svhn", root, train=False)


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_a_marker_without_the_md5s_is_a_corrupt_dataset(roots, tmp_path, name):
    root = _copy(roots, name, tmp_path)
    (root / SYNTHETIC_MARKERS[name]).write_text('{"train_32x32.mat": 1}')
    with pytest.raises(RuntimeError, match="not found or corrupted: the marker"):
        _open(name, root, train=True)


CORRUPTIONS = {
    "pet split list missing": ("oxford-pet", lambda f: (f / "annotations" / "test.txt").unlink(), False),
    "pet image missing": ("oxford-pet", lambda f: (f / "images" / "Abyssinian_1.jpg").unlink(), True),
    "pet bad line": ("oxford-pet", lambda f: (f / "annotations" / "trainval.txt").write_text("Abyssinian_1 x\n"), True),
    "pet class id 38": ("oxford-pet", lambda f: (f / "annotations" / "test.txt").write_text("a_1 38 1 1\n"), False),
    "food json missing": ("food101", lambda f: (f / "meta" / "train.json").unlink(), True),
    "food json not json": ("food101", lambda f: (f / "meta" / "test.json").write_text("{bad"), False),
    "food json a list": ("food101", lambda f: (f / "meta" / "test.json").write_text("[1, 2]"), False),
    "food 100 classes": ("food101", lambda f: (f / "meta" / "test.json").write_text('{"pizza": []}'), False),
    "food image missing": ("food101", lambda f: (f / "images" / "apple_pie" / "100001.jpg").unlink(), True),
    "cub list missing": ("cub200", lambda f: (f / "train_test_split.txt").unlink(), True),
    "cub image missing": ("cub200", lambda f: next((f / "images").rglob("*.jpg")).unlink(), True),
    "cub ids differ": ("cub200", lambda f: (f / "image_class_labels.txt").write_text("1 1\n"), False),
    "cub 199 classes": ("cub200", lambda f: _drop_last_line(f / "classes.txt"), True),
    "cub class 201": ("cub200", lambda f: _replace(f / "image_class_labels.txt", "1 1\n", "1 201\n"), True),
    "cub split 2": ("cub200", lambda f: _replace(f / "train_test_split.txt", "1 1\n", "1 2\n"), True),
    "cub not text": ("cub200", lambda f: (f / "images.txt").write_bytes(b"\xff\xfe\x00"), True),
}


def _drop_last_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.startswith(old)
    path.write_text(new + text[len(old) :])


@pytest.mark.parametrize("case", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_missing_or_broken_file_is_not_found_or_corrupted(roots, tmp_path, case):
    name, corrupt, train = case
    root = _copy(roots, name, tmp_path)
    corrupt(dataset_folder(name, root))
    with pytest.raises(RuntimeError, match="not found") as error:
        _open(name, root, train)
    assert "\n" not in str(error.value)


DOWNLOADS = {
    "cifar10": (torchvision.datasets.CIFAR10, "download"),
    "svhn": (torchvision.datasets.SVHN, "download"),
    "oxford-pet": (torchvision.datasets.OxfordIIITPet, "_download"),
    "food101": (torchvision.datasets.Food101, "_download"),
}


@pytest.mark.parametrize("name", [*DOWNLOADS, "cub200"])
def test_a_synthetic_folder_is_never_downloaded_over(roots, tmp_path, monkeypatch, name):
    def no_download(*args, **kwargs):
        raise AssertionError("download attempted over a synthetic folder")

    if name in DOWNLOADS:
        monkeypatch.setattr(*DOWNLOADS[name], no_download)
    monkeypatch.setattr(create_dataset, "download_and_extract_archive", no_download)
    root = _copy(roots, name, tmp_path)
    assert len(_open(name, root, train=False, download=True)) == SIZES[name][1]
    shutil.rmtree(dataset_folder(name, root))  # gone, but the marker says it was synthetic: made again, not fetched
    with pytest.raises(RuntimeError, match="not found"):
        _open(name, root, train=True, download=True)


def test_cub200_downloads_the_official_archive_when_missing(tmp_path, monkeypatch):
    calls = []

    def failing_download(url, download_root, md5=None, **kwargs):
        calls.append((url, download_root, md5))
        raise URLError("no network in tests")

    monkeypatch.setattr(create_dataset, "download_and_extract_archive", failing_download)
    with pytest.raises(URLError):
        open_dataset("cub200", tmp_path, True, None, True)
    assert calls == [(CUB200.url, str(tmp_path), "97eceeb196236b17998738112f37df78")]
    assert CUB200.url == "https://data.caltech.edu/records/65de6-vxr72/files/CUB_200_2011.tgz"
    with pytest.raises(RuntimeError, match="not found"):  # without download: not found, nothing fetched
        open_dataset("cub200", tmp_path, True, None, False)
    assert len(calls) == 1


def test_svhn_without_scipy_is_an_import_error(roots, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # `import scipy.io` now fails, as when scipy is missing
    with pytest.raises(ImportError):
        _open("svhn", roots["svhn"], train=True)
    with pytest.raises(ImportError):
        make_synthetic("svhn", tmp_path / "s", 10, 10)
    assert list(tmp_path.iterdir()) == []
    result = run_main(create_dataset, "--synthetic", tmp_path / "s", "--dataset", "svhn", "--train", "5")
    assert result.returncode == 2 and result.stderr.startswith("error: writing SVHN's .mat files needs scipy")
    assert result.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["cifar10", "svhn", "food101", "folder"])
def test_a_write_that_fails_midway_removes_what_it_made(tmp_path, monkeypatch, name):
    real_open, opened = open, []

    def failing_open(path, mode="r", *args, **kwargs):
        opened.append(path)
        if len(opened) == 3:
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(create_dataset, "open", failing_open, raising=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for root in (tmp_path / "new" / "d", tmp_path / "mine"):
        opened.clear()
        with pytest.raises(OSError):
            make_synthetic(name, root, 20, 10)
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "mine", tmp_path / "mine" / "notes.txt"]


# --------------------------------------------------------------------------- the folder dataset's layout problems


def _images(folder: Path, count: int = 2, mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.new(mode, (30 + k, 20), 100).save(folder / f"{mode}_{k}.png")


def _problem(root: Path, train: bool = True) -> str:
    with pytest.raises(DatasetProblem) as error:
        open_dataset("folder", root, train, None, False)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_folder_without_train_or_test_is_a_problem(tmp_path):
    tmp_path.joinpath("d").mkdir()
    assert _problem(tmp_path / "d").startswith(f"'{tmp_path / 'd'}' has no train/ folder: put the training images in")
    with pytest.raises(DatasetProblem, match="has no train/ folder"):
        dataset_classes("folder", tmp_path / "d")
    _images(tmp_path / "d" / "train" / "cat")
    assert "has no test/ folder" in _problem(tmp_path / "d")
    assert dataset_classes("folder", tmp_path / "d") == 1
    test = tmp_path / "d" / "test"
    test.mkdir()
    assert _problem(tmp_path / "d", train=False) == (
        f"'{test}' holds no class folder: put each class's images in {test}/<class>/"
    )


def test_folder_with_different_classes_in_train_and_test_is_a_problem(tmp_path):
    for split, classes in (("train", ["cat", "dog", "emu"]), ("test", ["cat", "dog", "fox", "gnu"])):
        for name in classes:
            _images(tmp_path / split / name)
    for train in (True, False):
        message = _problem(tmp_path, train)
        assert "differ (only in train/: emu; only in test/: fox, gnu); give both the same class folders" in message


def test_folder_with_a_class_without_images_is_a_problem(tmp_path):
    for split in ("train", "test"):
        _images(tmp_path / split / "cat")
        (tmp_path / split / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    message = _problem(tmp_path)
    assert message.startswith(f"the class folder '{tmp_path / 'train' / 'dog'}' holds no image (readable: .jpg")
    assert dataset_classes("folder", tmp_path) == 2  # counting the classes needs no image


def test_folder_images_of_any_mode_come_out_rgb(tmp_path):
    for split in ("train", "test"):
        _images(tmp_path / split / "a", mode="L")
        _images(tmp_path / split / "b" / "nested", mode="RGBA")  # ImageFolder reads subfolders of a class
        _images(tmp_path / split / "c", mode="P")
    dataset = open_dataset("folder", tmp_path, True, dataset_transforms("folder", 24)[1], True)  # download: ignored
    assert dataset.classes == ["a", "b", "c"] and dataset.labels[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert all(dataset[i][0].shape == (3, 24, 24) for i in range(len(dataset)))
    assert dataset_classes("folder", tmp_path) == 3


# --------------------------------------------------------------------------- transforms


def test_cifar_transforms_at_32_are_the_papers_own():
    for name in ("cifar100", "cifar10"):
        assert dataset_transforms(name, 32) == (TRAIN_TRANSFORM, TEST_TRANSFORM)


def test_svhn_transform_has_no_flip():
    train, test = dataset_transforms("svhn", 32)
    assert [type(t) for t in train.transforms] == [transforms.RandomCrop, transforms.ToTensor, transforms.Normalize]
    assert train.transforms[0].padding == 4 and tuple(train.transforms[2].mean) == MEAN
    assert tuple(train.transforms[2].std) == STD and test is TEST_TRANSFORM
    train, test = dataset_transforms("svhn", 48)
    assert not any(isinstance(t, transforms.RandomHorizontalFlip) for t in train.transforms + test.transforms)


@pytest.mark.parametrize("name", SMALL_IMAGE_DATASETS)
def test_a_32x32_dataset_at_another_size_resizes_before_to_tensor(name):
    train, test = dataset_transforms(name, 40)
    flip = [transforms.RandomHorizontalFlip] if name not in ("svhn", "mnist") else []  # digits are not mirrored
    tail = [transforms.Resize, transforms.ToTensor, transforms.Normalize]
    assert [type(t) for t in train.transforms] == [transforms.RandomCrop, *flip, *tail]
    assert [type(t) for t in test.transforms] == tail and test.transforms[0].size == 40
    image = Image.new("RGB", (32, 32))
    assert train(image).shape == test(image).shape == (3, 40, 40)


@pytest.mark.parametrize("name", LARGE)
def test_large_image_transforms_are_imagenets(name):
    train, test = dataset_transforms(name, 40)
    types = [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.ToTensor, transforms.Normalize]
    assert [type(t) for t in train.transforms] == types
    assert [type(t) for t in test.transforms] == [
        transforms.Resize,
        transforms.CenterCrop,
        transforms.ToTensor,
        transforms.Normalize,
    ]
    assert tuple(train.transforms[0].size) == (40, 40) and test.transforms[0].size == round(40 * 256 / 224) == 46
    assert tuple(test.transforms[-1].mean) == IMAGENET_MEAN and tuple(test.transforms[-1].std) == IMAGENET_STD
    image = Image.new("RGB", (57, 41))
    assert train(image).shape == test(image).shape == (3, 40, 40)


def test_dataset_transforms_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_transforms("emnist", 32)
    with pytest.raises(ValueError, match="image_size"):
        dataset_transforms("cifar10", 0)


# --------------------------------------------------------------------------- the device loader's flip


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_true_draws_exactly_as_before():
    """The draws and indices of the code before `flip` was added, written out."""
    n, size, padding = 50, 32, 4
    generator = _generator(7)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    ramp = torch.arange(size)
    cols = offsets[:, 1:] + torch.where(flips[:, None], size - 1 - ramp, ramp)
    rows, new_cols = crop_flip_indices(n, _generator(7), torch.device("cpu"))
    assert torch.equal(rows, offsets[:, :1] + ramp) and torch.equal(new_cols, cols)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=_generator(1), dtype=torch.uint8)
    assert torch.equal(augment_on_device(images, _generator(3)), augment_on_device(images, _generator(3), flip=True))


def test_flip_false_crops_only():
    n = 64
    rows, cols = crop_flip_indices(n, _generator(5), torch.device("cpu"), flip=False)
    offsets = torch.randint(0, 9, (n, 2), generator=_generator(5))
    assert torch.equal(rows, offsets[:, :1] + torch.arange(32)) and torch.equal(cols, offsets[:, 1:] + torch.arange(32))
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=_generator(2), dtype=torch.uint8)
    out = augment_on_device(images, _generator(5), flip=False)
    padded = torch.nn.functional.pad(images, (4,) * 4)
    for i in range(n):
        top, left = offsets[i].tolist()
        assert torch.equal(out[i], padded[i, :, top : top + 32, left : left + 32])


def test_device_loader_for_svhn_without_flip(roots):
    dataset = open_dataset("svhn", roots["svhn"], True, None, False)
    loader = DeviceLoader(dataset, 16, torch.device("cpu"), shuffle=True, augment=True, seed=0, flip=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and sum(len(labels) for _, labels in batches) == 60
    images, labels = batches[0]
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16, 1) and loader.flip is False
    assert DeviceLoader(dataset, 16, torch.device("cpu"), shuffle=False, augment=False, seed=0).flip is True


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("name", OTHERS)
def test_the_command_line_writes_each_dataset(tmp_path, name):
    result = run_main(create_dataset, "--synthetic", tmp_path / "d", "--dataset", name, "--train", 12, "--test", 4)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"wrote 12 train and 4 test images to {dataset_folder(name, tmp_path / 'd')}\n"
    assert len(_open(name, tmp_path / "d", True)) == 12 and len(_open(name, tmp_path / "d", False)) == 4
    again = run_main(create_dataset, "--synthetic", tmp_path / "d", "--dataset", name, "--train", 5)
    assert again.returncode == 2 and again.stdout == "" and again.stderr.count("\n") == 1
    assert again.stderr.endswith("exists already; choose another folder\n")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet' (choose from "),
        (["--dataset", "oxford-pet", "--train", "3681"], "--train must be at most 3680, the size of Oxford-IIIT Pet's"),
        (["--dataset", "food101", "--test", "25251"], "--test must be at most 25250, the size of Food-101's test set"),
        (["--dataset", "svhn", "--train", "73258"], "--train must be at most 73257, the size of SVHN's train set"),
        (["--dataset", "cub200", "--test", "0"], "--test must be at least 1 (got 0)"),
        (["--dataset", "folder", "--train", "10001"], "--train must be at most 10000 for --dataset folder (got 10001)"),
        (["--dataset", "cifar10", "--seed", "-1"], "--seed must be between 0 and 4294967295"),
    ],
)
def test_the_command_line_refuses_bad_input_in_one_line(tmp_path, flags, message):
    result = run_main(create_dataset, "--synthetic", tmp_path / "d", *flags)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_defaults(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(create_dataset, "make_synthetic", lambda name, root, **sizes: made.append((name, sizes)))
    for name in DATASETS:
        assert run_main(create_dataset, "--synthetic", tmp_path / name, "--dataset", name).returncode == 0
    assert [(name, sizes["n_train"], sizes["n_test"]) for name, sizes in made] == [
        ("cifar100", 50_000, 10_000),
        ("cifar10", 50_000, 10_000),
        ("svhn", 73_257, 26_032),
        ("fashion-mnist", 60_000, 10_000),
        ("mnist", 60_000, 10_000),
        ("oxford-pet", 370, 185),
        ("food101", 1010, 505),
        ("cub200", 2000, 1000),
        ("folder", 30, 15),
    ]
    help_text = run_main(create_dataset, "--help").stdout
    assert all(name in help_text for name in DATASETS) and "75,750" in help_text


def test_the_command_line_folder_dataset_goes_into_an_existing_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    result = run_main(create_dataset, "--synthetic", tmp_path / "mine", "--dataset", "folder", "--train", "6")
    assert result.returncode == 0 and result.stdout == f"wrote 6 train and 15 test images to {tmp_path / 'mine'}\n"
    again = run_main(create_dataset, "--synthetic", tmp_path / "mine", "--dataset", "folder")
    assert again.returncode == 2
    assert again.stderr == f"error: '{tmp_path / 'mine' / 'train'}' exists already; choose another folder\n"
