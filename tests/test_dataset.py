"""CIFAR-100 with the MAXL 4-level hierarchy: label maps, the dataset class, the synthetic archive,
the integrity checks, the paper's transforms and create_dataset's command line. CPU only; nothing is downloaded."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import run_main
from torchvision import transforms

import create_dataset
import model_vgg_single
from create_dataset import (
    CIFAR100,
    COARSE_LABEL_NAMES,
    COARSE_TO_10,
    FINE_LABEL_NAMES,
    FINE_TO_COARSE,
    LEVELS,
    SYNTHETIC_MARKER,
    TEN_TO_3,
    TEST_TRANSFORM,
    TRAIN_TRANSFORM,
    hierarchy_labels,
    hierarchy_psi,
    level_index,
    make_synthetic_cifar100,
)
from create_dataset import main as create_dataset_main

# The reference implementation's maps, copied from the reference notes.
REFERENCE_20_TO_10 = {
    0: 1, 1: 2, 2: 5, 3: 6, 4: 5, 5: 6, 6: 6, 7: 3, 8: 0, 9: 7,
    10: 8, 11: 0, 12: 1, 13: 3, 14: 4, 15: 0, 16: 2, 17: 5, 18: 9, 19: 9,
}  # fmt: skip
REFERENCE_10_TO_3 = {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 2, 7: 2, 8: 2, 9: 2}

# The official CIFAR-100 superclass table (https://www.cs.toronto.edu/~kriz/cifar.html),
# written with the archive's label names.
SUPERCLASS_MEMBERS = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}

WELL_KNOWN_PAIRS = [
    ("apple", "fruit_and_vegetables"),
    ("aquarium_fish", "fish"),
    ("baby", "people"),
    ("bear", "large_carnivores"),
    ("beaver", "aquatic_mammals"),
    ("bicycle", "vehicles_1"),
    ("bus", "vehicles_1"),
    ("tractor", "vehicles_2"),
    ("maple_tree", "trees"),
    ("rose", "flowers"),
    ("whale", "aquatic_mammals"),
    ("shark", "fish"),
    ("bottle", "food_containers"),
    ("television", "household_electrical_devices"),
    ("wardrobe", "household_furniture"),
    ("butterfly", "insects"),
    ("skyscraper", "large_man-made_outdoor_things"),
    ("mountain", "large_natural_outdoor_scenes"),
    ("elephant", "large_omnivores_and_herbivores"),
    ("fox", "medium_mammals"),
    ("spider", "non-insect_invertebrates"),
    ("dinosaur", "reptiles"),
    ("squirrel", "small_mammals"),
    ("rocket", "vehicles_2"),
    ("worm", "non-insect_invertebrates"),
]

PICKLE_KEYS = {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}


def _load_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _superclass_of(fine_name: str) -> str:
    return COARSE_LABEL_NAMES[FINE_TO_COARSE[FINE_LABEL_NAMES.index(fine_name)]]


# --------------------------------------------------------------------------- hierarchy maps


def test_levels_and_level_index():
    assert LEVELS == (3, 10, 20, 100)
    assert [level_index(n) for n in (3, 10, 20, 100)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        level_index(7)


def test_fine_to_coarse_has_100_entries_and_5_fine_per_superclass():
    assert len(FINE_TO_COARSE) == 100
    assert all(isinstance(c, int) and 0 <= c < 20 for c in FINE_TO_COARSE)
    counts = np.bincount(np.asarray(FINE_TO_COARSE), minlength=20)
    assert counts.tolist() == [5] * 20


def test_coarser_maps_match_reference():
    assert len(COARSE_TO_10) == 20
    assert len(TEN_TO_3) == 10
    assert dict(enumerate(COARSE_TO_10)) == REFERENCE_20_TO_10
    assert dict(enumerate(TEN_TO_3)) == REFERENCE_10_TO_3
    # Surjective at every level: every class of the coarser level is reached.
    assert set(COARSE_TO_10) == set(range(10))
    assert set(TEN_TO_3) == set(range(3))


def test_hierarchy_labels_composes_the_maps():
    fine = np.arange(100)
    labels = hierarchy_labels(fine, np.asarray(FINE_TO_COARSE))
    assert labels.shape == (100, 4)
    assert labels.dtype == np.int64
    for f in range(100):
        c = FINE_TO_COARSE[f]
        t = COARSE_TO_10[c]
        assert labels[f].tolist() == [TEN_TO_3[t], t, c, f]
    # Every class of each level is reached, and each column stays in its range.
    for col, n in enumerate(LEVELS):
        assert set(labels[:, col].tolist()) == set(range(n))
    # A tree: each class at a level has exactly one parent at every coarser level.
    for fine_col in range(1, 4):
        for coarse_col in range(fine_col):
            parents = {}
            for row in labels:
                parents.setdefault(int(row[fine_col]), set()).add(int(row[coarse_col]))
            assert all(len(p) == 1 for p in parents.values()), (fine_col, coarse_col)


def test_hierarchy_labels_uses_the_given_coarse_labels_for_column_2():
    # Column 2 is the archive's coarse label as given; columns 0 and 1 follow it.
    fine = np.array([0, 1, 2, 3])
    coarse = np.array([19, 0, 8, 14])
    labels = hierarchy_labels(fine, coarse)
    assert labels[:, 2].tolist() == coarse.tolist()
    assert labels[:, 3].tolist() == fine.tolist()
    assert labels[:, 1].tolist() == [COARSE_TO_10[c] for c in coarse]
    assert labels[:, 0].tolist() == [TEN_TO_3[COARSE_TO_10[c]] for c in coarse]


def test_label_names():
    assert len(FINE_LABEL_NAMES) == 100 and len(set(FINE_LABEL_NAMES)) == 100
    assert len(COARSE_LABEL_NAMES) == 20 and len(set(COARSE_LABEL_NAMES)) == 20
    # The archive's meta lists names in alphabetical order.
    assert list(FINE_LABEL_NAMES) == sorted(FINE_LABEL_NAMES)
    assert list(COARSE_LABEL_NAMES) == sorted(COARSE_LABEL_NAMES)
    assert set(COARSE_LABEL_NAMES) == set(SUPERCLASS_MEMBERS)
    assert sorted(n for members in SUPERCLASS_MEMBERS.values() for n in members) == sorted(FINE_LABEL_NAMES)


@pytest.mark.parametrize("fine_name, coarse_name", WELL_KNOWN_PAIRS)
def test_fine_to_coarse_well_known_pairs(fine_name, coarse_name):
    assert _superclass_of(fine_name) == coarse_name


@pytest.mark.parametrize("superclass", ["people", "trees"])
def test_superclass_has_exactly_its_five_members(superclass):
    members = sorted(FINE_LABEL_NAMES[f] for f in range(100) if COARSE_LABEL_NAMES[FINE_TO_COARSE[f]] == superclass)
    assert members == sorted(SUPERCLASS_MEMBERS[superclass])


def test_fine_to_coarse_matches_the_full_cifar100_table():
    for superclass, members in SUPERCLASS_MEMBERS.items():
        for name in members:
            assert _superclass_of(name) == superclass, name


# --------------------------------------------------------------------------- the dataset class


@pytest.mark.parametrize("train, n, split", [(True, 200, "train"), (False, 100, "test")])
def test_cifar100_items_and_labels(data_root, train, n, split):
    dataset = CIFAR100(data_root, train=train, transform=TEST_TRANSFORM)
    assert len(dataset) == n
    raw = _load_pickle(data_root / "cifar-100-python" / split)

    labels = dataset.labels
    assert labels.dtype == torch.int64 and labels.shape == (n, 4)
    assert labels[:, 2].tolist() == list(raw["coarse_labels"])
    assert labels[:, 3].tolist() == list(raw["fine_labels"])
    coarse = np.asarray(raw["coarse_labels"])
    assert labels[:, 1].tolist() == np.asarray(COARSE_TO_10)[coarse].tolist()
    assert labels[:, 0].tolist() == np.asarray(TEN_TO_3)[np.asarray(COARSE_TO_10)[coarse]].tolist()
    for col, k in enumerate(LEVELS):
        assert int(labels[:, col].min()) >= 0 and int(labels[:, col].max()) < k

    data = np.asarray(raw["data"]).reshape(n, 3, 32, 32).astype(np.float64)
    for i in (0, 1, n // 2, n - 1):
        image, item_labels = dataset[i]
        assert isinstance(image, torch.Tensor)
        assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
        assert item_labels.dtype == torch.int64 and item_labels.shape == (4,)
        assert item_labels.tolist() == labels[i].tolist()
        assert item_labels[2] == raw["coarse_labels"][i] and item_labels[3] == raw["fine_labels"][i]
        # Pixels: the archive's CHW row of 3072 bytes, scaled to [0, 1] then normalised.
        expected = torch.from_numpy((data[i] / 255 - 0.5) / 0.2).float()
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)


def test_cifar100_without_transform_gives_pil_images(data_root):
    dataset = CIFAR100(data_root, train=False)
    image, labels = dataset[3]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert labels.shape == (4,)
    assert dataset.classes == list(FINE_LABEL_NAMES)


# --------------------------------------------------------------------------- synthetic archive format


@pytest.mark.parametrize("split, n", [("train", 200), ("test", 100)])
def test_synthetic_files_in_real_format(data_root, split, n):
    raw = _load_pickle(data_root / "cifar-100-python" / split)
    assert isinstance(raw, dict)
    assert set(raw) == PICKLE_KEYS
    data = raw["data"]
    assert isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (n, 3072)
    assert len(raw["fine_labels"]) == len(raw["coarse_labels"]) == len(raw["filenames"]) == n
    assert all(isinstance(k, int) and 0 <= k < 100 for k in raw["fine_labels"])
    assert [FINE_TO_COARSE[f] for f in raw["fine_labels"]] == list(raw["coarse_labels"])
    assert len(set(raw["filenames"])) == n
    assert isinstance(raw["batch_label"], str)


def test_synthetic_meta_and_marker(data_root):
    folder = data_root / "cifar-100-python"
    meta = _load_pickle(folder / "meta")
    assert list(meta["fine_label_names"]) == list(FINE_LABEL_NAMES)
    assert list(meta["coarse_label_names"]) == list(COARSE_LABEL_NAMES)
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20

    marker = json.loads((data_root / SYNTHETIC_MARKER).read_text())
    assert set(marker) == {"train", "test", "meta"}
    for name, digest in marker.items():
        assert digest == _md5(folder / name)


def test_make_synthetic_is_deterministic_per_seed(tmp_path):
    a = make_synthetic_cifar100(tmp_path / "a", n_train=200, n_test=100, seed=7)
    b = make_synthetic_cifar100(tmp_path / "b", n_train=200, n_test=100, seed=7)
    c = make_synthetic_cifar100(tmp_path / "c", n_train=200, n_test=100, seed=8)
    md5_a = json.loads((a / SYNTHETIC_MARKER).read_text())
    md5_b = json.loads((b / SYNTHETIC_MARKER).read_text())
    md5_c = json.loads((c / SYNTHETIC_MARKER).read_text())
    assert md5_a == md5_b
    for name in ("train", "test", "meta"):
        assert (a / "cifar-100-python" / name).read_bytes() == (b / "cifar-100-python" / name).read_bytes()
    assert md5_a["train"] != md5_c["train"] and md5_a["test"] != md5_c["test"]
    assert md5_a["meta"] == md5_c["meta"]


def test_synthetic_every_class_present(data_root):
    train = _load_pickle(data_root / "cifar-100-python" / "train")
    assert np.bincount(train["fine_labels"], minlength=100).tolist() == [2] * 100


def test_synthetic_images_are_learnable(data_root):
    """Nearest class mean on raw pixels, fitted on train, scored on test: far above 1% chance."""
    train = _load_pickle(data_root / "cifar-100-python" / "train")
    test = _load_pickle(data_root / "cifar-100-python" / "test")
    x_train = train["data"].astype(np.float64)
    y_train = np.asarray(train["fine_labels"])
    x_test = test["data"].astype(np.float64)
    y_test = np.asarray(test["fine_labels"])
    means = np.stack([x_train[y_train == k].mean(axis=0) for k in range(100)])
    distances = (x_test**2).sum(1)[:, None] - 2 * x_test @ means.T + (means**2).sum(1)[None, :]
    accuracy = float((distances.argmin(axis=1) == y_test).mean())
    assert accuracy > 0.30, accuracy
    # Images are not constant: real pixel variation within each image.
    assert x_test.std(axis=1).min() > 10


# --------------------------------------------------------------------------- integrity checks


def _copy(data_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(data_root, root)
    return root


def test_copy_is_accepted(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    assert len(CIFAR100(root, train=True)) == 200


def test_flipped_byte_in_train_is_rejected(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    path = root / "cifar-100-python" / "train"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    for train in (True, False):
        with pytest.raises(RuntimeError, match="not found or corrupted"):
            CIFAR100(root, train=train)


def test_missing_test_file_is_rejected(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    (root / "cifar-100-python" / "test").unlink()
    for train in (True, False):
        with pytest.raises(RuntimeError, match="not found or corrupted"):
            CIFAR100(root, train=train)


def test_corrupted_meta_is_rejected(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    path = root / "cifar-100-python" / "meta"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(root, train=True)


def test_empty_folder_without_download_is_rejected(tmp_path):
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(tmp_path / "empty", train=True, download=False)
    (tmp_path / "empty2" / "cifar-100-python").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(tmp_path / "empty2", train=False, download=False)


def test_synthetic_folder_never_downloads(data_root, tmp_path, monkeypatch):
    """download=True over a synthetic folder must not fetch the real archive, even when corrupted."""

    def no_download(self):
        raise AssertionError("download attempted over a synthetic folder")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_download)
    root = _copy(data_root, tmp_path)
    assert len(CIFAR100(root, train=False, download=True)) == 100
    (root / "cifar-100-python" / "train").unlink()
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(root, train=True, download=True)


def test_synthetic_marker_does_not_leak_into_the_class(data_root):
    """The marker's md5s are set per instance; the class keeps the real archive's checksums."""
    CIFAR100(data_root, train=True)
    assert torchvision.datasets.CIFAR100.train_list == [["train", "16019d7e3df5f24257cddd939b257f8d"]]
    assert torchvision.datasets.CIFAR100.test_list == [["test", "f0ef6b0ae62326f3e7ffdfab6717acfc"]]
    assert torchvision.datasets.CIFAR100.meta["md5"] == "7973b15100ade9c7d40fb424638fde48"
    assert CIFAR100.meta["md5"] == "7973b15100ade9c7d40fb424638fde48"


BAD_MARKERS = {
    "not JSON": b"{bad",
    "empty": b"",
    "not text": b"\xff\xfe\x00{",
    "a list": b'["train", "test", "meta"]',
    "null": b"null",
    "a file missing": b'{"train": "0123", "test": "4567"}',
    "a number for an md5": b'{"train": 1, "test": "4567", "meta": "89ab"}',
}


@pytest.mark.parametrize("contents", BAD_MARKERS.values(), ids=BAD_MARKERS.keys())
def test_a_marker_without_the_md5s_is_a_corrupt_dataset(data_root, tmp_path, monkeypatch, contents):
    """As an md5 mismatch: RuntimeError (the scripts' "not found or corrupted"), and still no download."""

    def no_download(self):
        raise AssertionError("download attempted over a synthetic folder")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_download)
    root = _copy(data_root, tmp_path)
    (root / SYNTHETIC_MARKER).write_bytes(contents)
    for train in (True, False):
        with pytest.raises(RuntimeError, match="not found or corrupted"):
            CIFAR100(root, train=train, download=True)


def test_a_script_reports_a_bad_marker_in_one_line(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    (root / SYNTHETIC_MARKER).write_text("{bad")
    result = run_main(
        model_vgg_single, "--data-root", root, "--no-download", "--device", "cpu", "--workers", "0",
        "--results-dir", tmp_path / "r",
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: CIFAR-100 not found or corrupted in ") and result.stderr.count("\n") == 1
    assert f"it is synthetic: delete it and run python create_dataset.py --synthetic {root}" in result.stderr
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- transforms


def test_train_transform_is_the_papers():
    assert isinstance(TRAIN_TRANSFORM, transforms.Compose)
    steps = TRAIN_TRANSFORM.transforms
    assert [type(t) for t in steps] == [
        transforms.RandomCrop,
        transforms.RandomHorizontalFlip,
        transforms.ToTensor,
        transforms.Normalize,
    ]
    crop, flip, _, norm = steps
    assert tuple(crop.size) == (32, 32)
    assert crop.padding == 4
    assert crop.fill == 0
    assert crop.padding_mode == "constant"
    assert crop.pad_if_needed is False
    assert flip.p == 0.5
    assert tuple(norm.mean) == (0.5, 0.5, 0.5)
    assert tuple(norm.std) == (0.2, 0.2, 0.2)


def test_test_transform_is_the_papers():
    assert isinstance(TEST_TRANSFORM, transforms.Compose)
    steps = TEST_TRANSFORM.transforms
    assert [type(t) for t in steps] == [transforms.ToTensor, transforms.Normalize]
    assert tuple(steps[1].mean) == (0.5, 0.5, 0.5)
    assert tuple(steps[1].std) == (0.2, 0.2, 0.2)


def test_transforms_output_range(data_root):
    dataset = CIFAR100(data_root, train=True, transform=TRAIN_TRANSFORM)
    torch.manual_seed(0)
    image, _ = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= -2.5 - 1e-6 and float(image.max()) <= 2.5 + 1e-6


# ---------------------------------------------------------------------------------------------
# psi from the hierarchy


def children_counts(primary_level: int, aux_level: int) -> list[int]:
    """Counted independently of create_dataset: the official superclass table (names sorted as the archive
    numbers them) and the reference's 20 -> 10 -> 3 maps; the distinct aux-level classes under each primary one."""
    fine_names = sorted(name for members in SUPERCLASS_MEMBERS.values() for name in members)
    coarse_names = sorted(SUPERCLASS_MEMBERS)
    fine_to_coarse = {
        fine_names.index(name): coarse_names.index(superclass)
        for superclass, members in SUPERCLASS_MEMBERS.items()
        for name in members
    }
    to_level = {
        100: lambda f: f,
        20: lambda f: fine_to_coarse[f],
        10: lambda f: REFERENCE_20_TO_10[fine_to_coarse[f]],
        3: lambda f: REFERENCE_10_TO_3[REFERENCE_20_TO_10[fine_to_coarse[f]]],
    }
    children: dict[int, set[int]] = {}
    for fine in range(100):
        children.setdefault(to_level[primary_level](fine), set()).add(to_level[aux_level](fine))
    return [len(children[i]) for i in range(primary_level)]


@pytest.mark.parametrize("pair", [(3, 10), (3, 20), (3, 100), (10, 20), (10, 100), (20, 100)])
def test_hierarchy_psi_counts_the_finer_classes_inside_each_primary_class(pair):
    primary_level, aux_level = pair
    psi = hierarchy_psi(primary_level, aux_level)
    assert psi == children_counts(primary_level, aux_level)
    assert len(psi) == primary_level and sum(psi) == aux_level


def test_hierarchy_psi_of_the_papers_pairs():
    """The values the reference notes list, as a readable check of the counts above."""
    assert hierarchy_psi(3, 10) == [5, 1, 4]
    assert hierarchy_psi(3, 20) == [10, 3, 7]
    assert hierarchy_psi(10, 20) == [3, 2, 2, 2, 1, 3, 3, 1, 1, 2]
    assert hierarchy_psi(20, 100) == [5] * 20


@pytest.mark.parametrize("pair", [(20, 20), (20, 10), (10, 3)])
def test_hierarchy_psi_refuses_a_level_not_finer(pair):
    with pytest.raises(ValueError, match="not finer"):
        hierarchy_psi(*pair)


def test_split_holds_out_exactly_the_given_images(data_root):
    dataset = CIFAR100(data_root, train=True, transform=TRAIN_TRANSFORM)
    held = np.array([3, 0, 17, 150])
    rest, dev = dataset.split(held, held_out_transform=TEST_TRANSFORM)
    assert len(rest) == len(dataset) - 4 and len(dev) == 4
    assert dev.transform is TEST_TRANSFORM and rest.transform is TRAIN_TRANSFORM
    keep = np.setdiff1d(np.arange(len(dataset)), held)
    assert np.array_equal(rest.data, dataset.data[keep]) and np.array_equal(dev.data, dataset.data[np.sort(held)])
    assert torch.equal(rest.labels, dataset.labels[keep]) and rest.targets == [dataset.targets[i] for i in keep]
    assert torch.equal(dev[1][1], dataset.labels[3]) and len(dataset) == 200  # the original is unchanged


def test_the_command_line_writes_a_synthetic_dataset_the_scripts_accept(tmp_path, capsys):
    create_dataset_main(["--synthetic", str(tmp_path / "d"), "--train", "30", "--test", "10", "--seed", "3"])
    assert "wrote 30 train and 10 test images" in capsys.readouterr().out
    assert len(CIFAR100(tmp_path / "d", train=True)) == 30 and len(CIFAR100(tmp_path / "d", train=False)) == 10
    with pytest.raises(SystemExit) as exit_info:  # never over an existing dataset
        create_dataset_main(["--synthetic", str(tmp_path / "d"), "--train", "5"])
    assert exit_info.value.code == 2 and "exists already" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        create_dataset_main(["--synthetic", str(tmp_path / "e"), "--train", "0"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --train must be at least 1 (got 0)\n"
    assert not (tmp_path / "e").exists()


def _refused(argv: list[str], capsys) -> str:
    """create_dataset's command line on `argv`, which must exit with code 2: what it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        create_dataset_main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    "split, count, most", [("train", 10**12, 50_000), ("train", 50_001, 50_000), ("test", 10_001, 10_000)]
)
def test_the_command_line_refuses_more_images_than_cifar100_has(tmp_path, capsys, split, count, most):
    """Refused before anything is made: 10^12 images would run out of memory, after making the folder."""
    err = _refused(["--synthetic", str(tmp_path / "d"), f"--{split}", str(count)], capsys)
    assert err == f"error: --{split} must be at most {most}, the size of CIFAR-100's {split} set (got {count})\n"
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_allows_from_1_image_to_cifar100s_own_sizes(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(create_dataset, "make_synthetic_cifar100", lambda root, **sizes: made.append(sizes))
    for train, test in (("1", "1"), ("50000", "10000")):
        create_dataset_main(["--synthetic", str(tmp_path / train), "--train", train, "--test", test])
    assert made == [dict(n_train=1, n_test=1, seed=0), dict(n_train=50_000, n_test=10_000, seed=0)]


def _disk_full_in_file(number: int, error: BaseException):
    """An `open` for create_dataset under which the `number`-th file it opens (0: train, 1: test, 2: meta,
    3: the marker) takes 10 bytes, then its next write raises `error`: a disk full midway, or a Ctrl-C."""
    opened = []

    class File:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.f.close()

        def write(self, data):
            if len(opened) - 1 == number:
                self.f.write(data[:10])
                raise error
            return self.f.write(data)

    def open_(path, mode="r", *args, **kwargs):
        opened.append(path)
        return File(builtins.open(path, mode, *args, **kwargs))

    return open_


DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("error", [DISK_FULL, KeyboardInterrupt()], ids=["disk full", "ctrl-c"])
@pytest.mark.parametrize("number", [0, 1, 2, 3], ids=["train", "test", "meta", "marker"])
def test_a_write_that_fails_midway_removes_what_it_made(tmp_path, monkeypatch, number, error):
    monkeypatch.setattr(create_dataset, "open", _disk_full_in_file(number, error), raising=False)
    with pytest.raises(type(error)):
        make_synthetic_cifar100(tmp_path / "new" / "d", n_train=30, n_test=10)
    assert list(tmp_path.iterdir()) == []  # the two folders it made, too
    # Into a folder that was there: the folder and what was in it stay.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    monkeypatch.setattr(create_dataset, "open", _disk_full_in_file(number, error), raising=False)
    with pytest.raises(type(error)):
        make_synthetic_cifar100(tmp_path / "d", n_train=30, n_test=10)
    assert list(tmp_path.iterdir()) == [tmp_path / "d"] and list((tmp_path / "d").iterdir()) == [
        tmp_path / "d" / "notes.txt"
    ]


def test_the_command_line_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(create_dataset, "open", _disk_full_in_file(1, DISK_FULL), raising=False)
    err = _refused(["--synthetic", str(tmp_path / "d"), "--train", "30", "--test", "10"], capsys)
    assert err == (
        f"error: cannot write to '{tmp_path / 'd'}' (No space left on device); nothing was left behind; "
        "choose another folder\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    with pytest.raises(MemoryError):  # 10^15 images: more than any address space holds, refused at once
        make_synthetic_cifar100(tmp_path / "d", n_train=10**15)
    assert list(tmp_path.iterdir()) == []

    def out_of_memory(root, **sizes):
        raise MemoryError

    monkeypatch.setattr(create_dataset, "make_synthetic_cifar100", out_of_memory)
    assert _refused(["--synthetic", str(tmp_path / "d")], capsys) == (
        "error: not enough memory to make 50000 train and 10000 test images; nothing was left behind; "
        "ask for fewer with --train and --test\n"
    )


@pytest.mark.parametrize("folder", ["", "   "], ids=["empty", "blank"])
def test_the_command_line_refuses_an_empty_folder(tmp_path, monkeypatch, capsys, folder):
    """An empty path would write cifar-100-python/ into the current folder."""
    monkeypatch.chdir(tmp_path)
    err = _refused(["--synthetic", folder, "--train", "5", "--test", "5"], capsys)
    assert err == (
        "error: argument --synthetic: an empty path names no folder; give the folder to write into (see --help)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train", "-5"], "--train must be at least 1 (got -5)"),
        (["--test", "-1"], "--test must be at least 1 (got -1)"),
        (["--train", "abc"], "argument --train: invalid int value: 'abc' (see --help)"),
        (["--test", "2.5"], "argument --test: invalid int value: '2.5' (see --help)"),
        (["--train", ""], "argument --train: invalid int value: '' (see --help)"),
        (["--train"], "argument --train: expected one argument (see --help)"),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295"),
        (["--seed", "4294967296"], "--seed must be between 0 and 4294967295"),
        (["--size", "5"], "unrecognized arguments: --size 5 (see --help)"),
    ],
)
def test_the_command_line_refuses_a_bad_value_in_one_line(tmp_path, capsys, flags, message):
    assert _refused(["--synthetic", str(tmp_path / "d"), *flags], capsys) == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_refuses_a_missing_or_unusable_folder_in_one_line(tmp_path, capsys):
    message = "error: one of the arguments --synthetic --subset is required (see --help)\n"
    assert _refused(["--train", "5"], capsys) == message
    too_long = tmp_path / ("a" * 300)  # more than a file name may have: even asking whether it exists fails
    assert _refused(["--synthetic", str(too_long), "--train", "5", "--test", "5"], capsys) == (
        f"error: cannot write to '{too_long}' (File name too long); nothing was left behind; choose another folder\n"
    )
    (tmp_path / "file").write_text("")
    err = _refused(["--synthetic", str(tmp_path / "file"), "--train", "5", "--test", "5"], capsys)
    assert err.startswith(f"error: cannot write to '{tmp_path / 'file'}' (") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "file"] and (tmp_path / "file").read_text() == ""


def test_md5_of_an_unchanged_file_is_checked_once_per_process(data_root, tmp_path, monkeypatch):
    import create_dataset

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    checked = []
    real = create_dataset.check_integrity
    monkeypatch.setattr(create_dataset, "check_integrity", lambda path, md5: checked.append(path) or real(path, md5))
    CIFAR100(root, train=True, download=True)  # torchvision: download() checks, then __init__ checks again
    CIFAR100(root, train=False)
    assert sorted(Path(p).name for p in checked) == ["test", "train"]
    # A changed file is checked again, and a damaged one refused.
    train_file = root / "cifar-100-python" / "train"
    damaged = bytearray(train_file.read_bytes())
    damaged[2000] ^= 0xFF
    train_file.write_bytes(bytes(damaged))
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(root, train=False)
