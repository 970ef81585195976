"""CIFAR-100 with the 4-level label hierarchy of MAXL (Liu, Davison, Johns, NeurIPS 2019), and six more datasets.

Every image carries four labels, coarse to fine: 3, 10, 20 and 100 classes. The 20 classes
are CIFAR-100's superclasses (``coarse_labels`` in the archive), the 100 its fine classes;
the 10- and 3-class levels group the superclasses further, as in the paper's Appendix A.

    from create_dataset import CIFAR100, TRAIN_TRANSFORM
    train_set = CIFAR100("dataset", train=True, transform=TRAIN_TRANSFORM, download=True)
    image, labels = train_set[0]      # labels[k], k = 0, 1, 2, 3: the 3-, 10-, 20-, 100-class label

The other datasets (DATASETS: CIFAR-10, SVHN, Oxford-IIIT Pet, Food-101, CUB-200-2011 and a folder of
one's own images, root/{train,test}/<class>/) have one label per image, labels of shape (N, 1):

    train_transform, test_transform = dataset_transforms("food101", image_size=64)
    train_set = open_dataset("food101", "dataset", train=True, transform=train_transform, download=True)

Also here: ``make_synthetic`` (a small, learnable dataset in each dataset's exact on-disk format, for
tests and smoke runs; ``python create_dataset.py --synthetic DIR [--dataset NAME] --train N --test M``
writes one from the command line) and ``DeviceLoader`` (a 32x32 dataset as one uint8 tensor on the
GPU, augmented there, for fast CUDA runs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gzip
import hashlib
import io
import itertools
import json
import os
import pickle
import signal
import struct
import sys
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

LEVELS = (3, 10, 20, 100)
"""Number of classes at each level of the hierarchy; ``labels[:, LEVELS.index(n)]``."""

# Fine class -> CIFAR-100 superclass, the map the real archive's coarse_labels follow.
FINE_TO_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)  # fmt: skip
# Superclass (20) -> 10 classes, and 10 -> 3 classes: the paper's hierarchy (reference maps).
COARSE_TO_10 = (1, 2, 5, 6, 5, 6, 6, 3, 0, 7, 8, 0, 1, 3, 4, 0, 2, 5, 9, 9)
TEN_TO_3 = (0, 0, 0, 0, 0, 1, 2, 2, 2, 2)

FINE_LABEL_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy "
    "porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television "
    "tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
COARSE_LABEL_NAMES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables "
    "household_electrical_devices household_furniture insects large_carnivores "
    "large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores "
    "medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2"
).split()

MEAN = (0.5, 0.5, 0.5)
STD = (0.2, 0.2, 0.2)
TRAIN_TRANSFORM = transforms.Compose(
    [
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ]
)
TEST_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

DATASETS = ("cifar100", "cifar10", "svhn", "fashion-mnist", "mnist", "oxford-pet", "food101", "cub200", "folder")
"""What ``open_dataset`` opens; "folder" is one's own images, root/train/<class>/ and root/test/<class>/."""
SMALL_IMAGE_DATASETS = ("cifar100", "cifar10", "svhn", "fashion-mnist", "mnist")
"""32x32 images held in memory as uint8 (``data``, (N, 32, 32, 3)): the paper's pipeline and DeviceLoader."""
NUM_CLASSES = {"cifar100": 100, "cifar10": 10, "svhn": 10, "fashion-mnist": 10, "mnist": 10}
NUM_CLASSES |= {"oxford-pet": 37, "food101": 101, "cub200": 200}
"""Classes of each dataset ("folder": as many as root/train has class folders, see dataset_classes)."""
DATASET_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "svhn": "SVHN", "oxford-pet": "Oxford-IIIT Pet"}
DATASET_NAMES |= {"food101": "Food-101", "cub200": "CUB-200-2011", "folder": "the image folder"}
DATASET_NAMES |= {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}
DOWNLOAD_SIZES = {"cifar100": "161 MB", "cifar10": "163 MB", "svhn": "246 MB", "oxford-pet": "790 MB"}
DOWNLOAD_SIZES |= {"food101": "5.0 GB", "cub200": "1.1 GB", "fashion-mnist": "30 MB", "mnist": "11 MB"}
# Images in each real train and test set: the most the command line writes (no script needs more).
REAL_SIZES = {"cifar100": (50_000, 10_000), "cifar10": (50_000, 10_000), "svhn": (73_257, 26_032)}
REAL_SIZES |= {"oxford-pet": (3_680, 3_669), "food101": (75_750, 25_250), "cub200": (5_994, 5_794)}
REAL_SIZES |= {"fashion-mnist": (60_000, 10_000), "mnist": (60_000, 10_000)}
NO_FLIP = ("svhn", "mnist")  # digits are not mirror-symmetric; clothes (Fashion-MNIST) and CIFAR's objects are
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Where each dataset's files live under its root (dataset_folder): "folder" is the root itself.
DATASET_FOLDERS = {"cifar100": "cifar-100-python", "cifar10": "cifar-10-batches-py", "svhn": "svhn"}
DATASET_FOLDERS |= {"oxford-pet": "oxford-iiit-pet", "food101": "food-101", "cub200": "CUB_200_2011", "folder": "."}
DATASET_FOLDERS |= {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}  # torchvision's: root/<class name>/raw/
# The file make_synthetic writes under root beside each dataset's folder (is_synthetic); for cifar10, svhn and
# cifar100 (SYNTHETIC_MARKER) it holds the md5 of each file, which torchvision checks instead of the real ones.
SYNTHETIC_MARKERS = {name: f"{folder}.synthetic.json" for name, folder in DATASET_FOLDERS.items()}
SYNTHETIC_MARKERS["folder"] = "synthetic.json"  # the folder dataset is the root itself: its marker is inside
SYNTHETIC_MARKER = SYNTHETIC_MARKERS["cifar100"]
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
# MNIST's and Fashion-MNIST's four idx files, and the md5 of each one's content, uncompressed (the .gz files
# torchvision downloads have md5s of their own; the same data compressed again, as Debian's dataset-fashion-mnist
# package ships it, is checked by these: the files' published checksums, as other loaders record them).
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_MD5 = {
    "mnist": (
        "6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
        "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637",
    ),
    "fashion-mnist": (
        "f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
        "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}  # fmt: skip
FASHION_MNIST_LABEL_NAMES = "t-shirt/top trouser pullover dress coat sandal shirt sneaker bag ankle-boot".split()

CIFAR10_LABEL_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
# The 37 breeds in class-id order (CLASS-ID 1..37 in the annotations); a capital first letter is a cat.
PET_BREEDS = (
    "Abyssinian american_bulldog american_pit_bull_terrier basset_hound beagle Bengal Birman Bombay boxer "
    "British_Shorthair chihuahua Egyptian_Mau english_cocker_spaniel english_setter german_shorthaired "
    "great_pyrenees havanese japanese_chin keeshond leonberger Maine_Coon miniature_pinscher newfoundland "
    "Persian pomeranian pug Ragdoll Russian_Blue saint_bernard samoyed scottish_terrier shiba_inu Siamese "
    "Sphynx staffordshire_bull_terrier wheaten_terrier yorkshire_terrier"
).split()
# Sorted as torchvision's Food101 numbers them (sorted meta/*.json keys).
FOOD101_CLASSES = sorted(
    "apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap bread_pudding "
    "breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche cheesecake cheese_plate "
    "chicken_curry chicken_quesadilla chicken_wings chocolate_cake chocolate_mousse churros clam_chowder "
    "club_sandwich crab_cakes creme_brulee croque_madame cup_cakes deviled_eggs donuts dumplings edamame "
    "eggs_benedict escargots falafel filet_mignon fish_and_chips foie_gras french_fries french_onion_soup "
    "french_toast fried_calamari fried_rice frozen_yogurt garlic_bread gnocchi greek_salad grilled_cheese_sandwich "
    "grilled_salmon guacamole gyoza hamburger hot_and_sour_soup hot_dog huevos_rancheros hummus ice_cream lasagna "
    "lobster_bisque lobster_roll_sandwich macaroni_and_cheese macarons miso_soup mussels nachos omelette "
    "onion_rings oysters pad_thai paella pancakes panna_cotta peking_duck pho pizza pork_chop poutine prime_rib "
    "pulled_pork_sandwich ramen ravioli red_velvet_cake risotto samosa sashimi scallops seaweed_salad "
    "shrimp_and_grits spaghetti_bolognese spaghetti_carbonara spring_rolls steak strawberry_shortcake sushi tacos "
    "takoyaki tiramisu tuna_tartare waffles".split()
)
SYNTHETIC_FOLDER_CLASSES = ("apple", "banana", "cherry")
"""The class folders make_synthetic("folder", ...) writes."""


def level_index(num_classes: int) -> int:
    """Column of the label tensor holding the level with ``num_classes`` classes."""
    return LEVELS.index(num_classes)


def domain_classes(domain: int) -> tuple[int, ...]:
    """The fine classes of CIFAR-100 superclass `domain` (0-19), ascending: a domain task's labels 0-4 in order."""
    return tuple(fine for fine, coarse in enumerate(FINE_TO_COARSE) if coarse == domain)


DOMAIN_LABEL = tuple(domain_classes(FINE_TO_COARSE[fine]).index(fine) for fine in range(100))
"""Fine class -> its label (0-4) in its superclass's 5-way task, the fine labels renumbered in ascending order."""


def domain_indices(labels, domain: int) -> np.ndarray:
    """Indices of the images of superclass `domain` among (N, 4) hierarchy labels, in their order."""
    return np.flatnonzero(np.asarray(labels)[:, LEVELS.index(20)] == domain)


def hierarchy_psi(primary_level: int, aux_level: int) -> list[int]:
    """psi[i] = the number of classes of the finer `aux_level` inside class i of `primary_level`."""
    if LEVELS.index(aux_level) <= LEVELS.index(primary_level):
        raise ValueError(f"aux_level {aux_level} is not finer than primary_level {primary_level}")
    every_class = hierarchy_labels(np.arange(100), FINE_TO_COARSE)  # each fine class's label at every level
    pairs = np.unique(every_class[:, [LEVELS.index(primary_level), LEVELS.index(aux_level)]], axis=0)
    return np.bincount(pairs[:, 0], minlength=primary_level).tolist()


def hierarchy_labels(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """(N, 4) int64 labels [3, 10, 20, 100 classes] from fine labels and archive superclasses."""
    coarse = np.asarray(coarse, dtype=np.int64)
    ten = np.asarray(COARSE_TO_10, dtype=np.int64)[coarse]
    three = np.asarray(TEN_TO_3, dtype=np.int64)[ten]
    return np.stack([three, ten, coarse, np.asarray(fine, dtype=np.int64)], axis=1)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _marker_checksums(marker: Path, names: Sequence[str]) -> dict[str, str]:
    """The md5 of each of `names`, as make_synthetic wrote them into `marker`.

    A marker that does not hold them leaves nothing to check the files against: the folder is corrupt, and
    RuntimeError is what torchvision raises for a corrupt folder (the scripts say "not found or corrupted").
    """
    try:
        md5 = json.loads(marker.read_text())
    except ValueError:  # not JSON, or not even text: JSONDecodeError and UnicodeDecodeError are ValueErrors
        md5 = None
    if not (isinstance(md5, dict) and all(isinstance(md5.get(name), str) for name in names)):
        raise RuntimeError(
            f"Dataset not found or corrupted: the marker '{marker}' does not hold the md5 of {', '.join(names)} as JSON"
        )
    return md5


_VERIFIED_FILES: set[tuple] = set()  # (path, md5, size, mtime) of dataset files whose md5 matched in this process


def _verified(path: Path, md5: str) -> bool:
    """torchvision's check_integrity of `path`, once per process for a file that has not changed since."""
    try:
        stat = path.stat()
    except OSError:
        return False
    key = (str(path.resolve()), md5, stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED_FILES and check_integrity(str(path), md5):
        _VERIFIED_FILES.add(key)
    return key in _VERIFIED_FILES


class DatasetProblem(Exception):
    """A dataset folder that cannot be used as it is (e.g. folder/ without train/, class lists of train/ and test/
    differ, a class folder with no image): str(error) is one line saying what is wrong and how to fix it."""


def _corrupted(what: str) -> RuntimeError:
    """torchvision's error for a dataset that is not there or not whole (the scripts say "not found or corrupted")."""
    return RuntimeError(f"Dataset not found or corrupted: {what}. You can use download=True to download it")


def _check_files(paths: list[Path], listed_in: Path) -> None:
    """RuntimeError unless every image `listed_in` names is there: better at the start than in epoch 30."""
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise _corrupted(
            f"{len(missing)} of the {len(paths)} images listed in '{listed_in}' are missing (the first: '{missing[0]}')"
        )


def _one_label(classes: list[int]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(classes, dtype=np.int64).reshape(-1, 1))


class _Dataset:
    """What the dataset classes add to torchvision's: items ``(image, labels)``, ``labels`` a LongTensor row of the
    (N, 4) or (N, 1) ``labels``, and ``subset``. Each class reads its image with ``_image`` (default: the 32x32
    sets' uint8 ``data``); ``transform`` is read at every item, so it can be set after construction. _NAME: the
    dataset's name in DATASETS; _ITEMS: the attributes besides ``labels`` that hold per-item state."""

    _NAME: str
    _ITEMS: tuple[str, ...] = ()

    def _image(self, index: int) -> Image.Image:
        return Image.fromarray(self.data[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self._image(index)
        return (self.transform(image) if self.transform is not None else image), self.labels[index]

    def subset(self, indices, transform=None):
        """A dataset of the same kind holding the items at `indices`, in that order (transform None: this one's)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        part = copy.copy(self)
        for name in ("labels", *self._ITEMS):
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value = value[index]
            elif isinstance(value, torch.Tensor):
                value = value[torch.from_numpy(index)]
            else:
                value = [value[i] for i in index]
            setattr(part, name, value)
        if transform is not None:
            part.transform = transform
        return part


class _CIFAR(_Dataset):
    """torchvision's CIFAR-10 or CIFAR-100 (download, md5 checks), also from a folder make_synthetic wrote: its
    marker beside the archive's folder holds the md5 of each file, and torchvision checks the files against those."""

    _ITEMS = ("data", "targets")

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        marker = Path(root) / SYNTHETIC_MARKERS[self._NAME]
        if marker.is_file():
            meta = self.meta["filename"]
            md5 = _marker_checksums(marker, [name for name, _ in self.train_list + self.test_list] + [meta])
            self.train_list = [[name, md5[name]] for name, _ in self.train_list]
            self.test_list = [[name, md5[name]] for name, _ in self.test_list]
            self.meta = {**self.meta, "md5": md5[meta]}
            download = False  # never download the real archive over a synthetic folder
        super().__init__(root, train=train, transform=transform, download=download)
        self.labels = self._labels()

    def _labels(self) -> torch.Tensor:
        return _one_label(self.targets)

    def _check_integrity(self) -> bool:
        """torchvision's md5 check of the train and test files, once per process for a file that has not
        changed since: torchvision runs it up to three times to load the train and the test set (CIFAR-100: 180 MB)."""
        return all(
            _verified(Path(self.root, self.base_folder, name), md5) for name, md5 in self.train_list + self.test_list
        )


class CIFAR100(_CIFAR, torchvision.datasets.CIFAR100):
    """torchvision's CIFAR-100 (download, md5 checks) whose items are ``(image, labels)``.

    ``labels`` is a LongTensor of shape (4,): the 3-, 10-, 20- and 100-class labels.
    A folder written by ``make_synthetic_cifar100`` is accepted too: its marker file holds
    the md5 of each file, and torchvision checks the files against those instead.
    """

    _NAME = "cifar100"

    def _labels(self) -> torch.Tensor:
        # The files are md5-checked, so their coarse_labels are FINE_TO_COARSE of the fine labels: mapping
        # them saves reading the 150 MB train file a second time (torchvision keeps only the fine labels).
        fine = np.asarray(self.targets, dtype=np.int64)
        return torch.from_numpy(hierarchy_labels(fine, np.asarray(FINE_TO_COARSE, dtype=np.int64)[fine]))

    def split(self, held_out: np.ndarray, held_out_transform=None) -> tuple[CIFAR100, CIFAR100]:
        """(the images not in `held_out`, the images in it), as two datasets; the second with its own transform."""
        mask = np.zeros(len(self.data), dtype=bool)
        mask[np.asarray(held_out, dtype=np.int64)] = True
        rest, held = self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))
        held.transform = held_out_transform
        return rest, held


class CIFAR10(_CIFAR, torchvision.datasets.CIFAR10):
    """torchvision's CIFAR-10 whose items are ``(image, labels)``, labels of shape (1,); see _CIFAR."""

    _NAME = "cifar10"


class _MNIST(_Dataset):
    """torchvision's MNIST or Fashion-MNIST (download, md5 checks), 28x28 grayscale: each image padded with 2 black
    pixels on every side to 32x32 (the digit or garment stays whole and unscaled, as LeNet-5 took MNIST) and repeated
    on three channels, kept as `data` uint8 (N, 32, 32, 3) like CIFAR's, so the paper's 32x32 pipeline and
    DeviceLoader take it as it is. The four .gz files in root/<FashionMNIST or MNIST>/raw/ are enough without a
    network, also with download=False: each is checked (by the md5 torchvision knows, or its content's, IDX_MD5) and
    extracted there. A folder make_synthetic (or write_subset) wrote is checked by the md5s in its marker."""

    _ITEMS = ("data", "targets")

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        marker = next((m for m in _markers(self._NAME, root) if m.is_file()), None)
        if marker is not None:
            md5 = _marker_checksums(marker, [f"{name}.gz" for name in IDX_FILES])
            self.resources = [(f"{name}.gz", md5[f"{name}.gz"]) for name in IDX_FILES]
            download = False  # never download the real files over a synthetic folder or a subset
        self._extract(Path(root) / type(self).__name__ / "raw", content_md5=None if marker else IDX_MD5[self._NAME])
        super().__init__(root, train=train, transform=transform, download=download)
        padded = F.pad(self.data, (2, 2, 2, 2))  # (N, 28, 28) -> (N, 32, 32), zeros: the images' black background
        self.data = padded.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous().numpy()
        self.labels = _one_label(self.targets)

    def _extract(self, raw: Path, content_md5: Sequence[str] | None) -> None:
        """Extract each .gz file that is whole and not yet extracted (torchvision's download does so too, after its
        check, but only with download=True and only for the files it would download). A file that is not whole is
        left: torchvision then finds the dataset incomplete (the scripts say "not found or corrupted")."""
        for (archive, md5), name, expected in zip(self.resources, IDX_FILES, content_md5 or [None] * len(IDX_FILES)):
            if (raw / name).is_file() or not (raw / archive).is_file():
                continue
            try:
                content = gzip.decompress((raw / archive).read_bytes())
            except (OSError, EOFError, zlib.error):
                continue
            if _verified(raw / archive, md5) or (expected and hashlib.md5(content).hexdigest() == expected):
                tmp = raw / f".{name}.tmp"
                tmp.write_bytes(content)
                tmp.replace(raw / name)


class FashionMNIST(_MNIST, torchvision.datasets.FashionMNIST):
    """Fashion-MNIST, 10 kinds of clothing (FASHION_MNIST_LABEL_NAMES); labels of shape (N, 1); see _MNIST."""

    _NAME = "fashion-mnist"


class MNIST(_MNIST, torchvision.datasets.MNIST):
    """MNIST, the digits 0-9; labels of shape (N, 1); see _MNIST."""

    _NAME = "mnist"


class SVHN(_Dataset, torchvision.datasets.SVHN):
    """torchvision's SVHN (root/svhn/{train,test}_32x32.mat; needs scipy), labels 0-9 of shape (N, 1).

    ``data`` is uint8 (N, 32, 32, 3) as CIFAR's (torchvision keeps (N, 3, 32, 32)). A folder written by
    ``make_synthetic("svhn", ...)`` is accepted too: its marker holds the md5 torchvision checks.
    """

    _NAME, _ITEMS = "svhn", ("data",)

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        split = "train" if train else "test"
        marker = Path(root) / SYNTHETIC_MARKERS["svhn"]
        if marker.is_file():
            md5 = _marker_checksums(marker, SVHN_FILES)
            url, filename, _ = self.split_list[split]
            self.split_list = {**self.split_list, split: [url, filename, md5[filename]]}  # this instance's only
            download = False  # never download the real files over a synthetic folder
        super().__init__(Path(root) / DATASET_FOLDERS["svhn"], split=split, transform=transform, download=download)
        self.data = np.ascontiguousarray(self.data.transpose(0, 2, 3, 1))
        self.labels = _one_label(self.labels)  # torchvision has mapped the digit 0's label 10 to 0

    def _check_integrity(self) -> bool:
        """torchvision's md5 check (the train file is 182 MB), once per process for an unchanged file."""
        return _verified(Path(self.root, self.filename), self.split_list[self.split][2])


class OxfordIIITPet(_Dataset, torchvision.datasets.OxfordIIITPet):
    """torchvision's Oxford-IIIT Pet, 37 breeds: "trainval" for train, "test" for test; labels of shape (N, 1).

    Also refused as "not found or corrupted" (RuntimeError): a missing or unreadable split list, and a listed
    image that is not there.
    """

    _NAME, _ITEMS = "oxford-pet", ("_images", "_labels", "_bin_labels", "_segs")

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        split = "trainval" if train else "test"
        download = download and not is_synthetic(self._NAME, root)  # never download the real archives over it
        try:
            super().__init__(root, split=split, target_types="category", download=download)
        except ValueError as error:  # a line that is not "Image CLASS-ID SPECIES BREED-ID", or not text
            raise _corrupted(f"annotations/{split}.txt cannot be read ({error})") from None
        if not all(0 <= label < NUM_CLASSES["oxford-pet"] for label in self._labels):
            raise _corrupted(f"annotations/{split}.txt has a CLASS-ID outside 1..37")
        _check_files(self._images, self._anns_folder / f"{split}.txt")
        self.transform = transform
        self.labels = _one_label(self._labels)

    def _check_exists(self) -> bool:
        return super()._check_exists() and (self._anns_folder / f"{self._split}.txt").is_file()

    def _image(self, index: int) -> Image.Image:
        return Image.open(self._images[index]).convert("RGB")


class Food101(_Dataset, torchvision.datasets.Food101):
    """torchvision's Food-101, 101 classes; labels of shape (N, 1).

    Also refused as "not found or corrupted" (RuntimeError): a missing or unreadable meta/<split>.json, one that
    does not name the 101 classes, and a listed image that is not there.
    """

    _NAME, _ITEMS = "food101", ("_image_files", "_labels")

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        split = "train" if train else "test"
        download = download and not is_synthetic(self._NAME, root)  # never download the real archive over it
        try:
            super().__init__(root, split=split, transform=transform, download=download)
        except (ValueError, TypeError, AttributeError) as error:  # not JSON, or not {class: [image, ...]}
            raise _corrupted(f"meta/{split}.json cannot be read ({error})") from None
        if len(self.classes) != NUM_CLASSES["food101"]:
            raise _corrupted(f"meta/{split}.json names {len(self.classes)} classes, not Food-101's 101")
        _check_files(self._image_files, self._meta_folder / f"{split}.json")
        self.labels = _one_label(self._labels)

    def _check_exists(self) -> bool:
        return super()._check_exists() and (self._meta_folder / f"{self._split}.json").is_file()

    def _image(self, index: int) -> Image.Image:
        return self.loader(self._image_files[index])


class CUB200(_Dataset, torch.utils.data.Dataset):
    """Caltech-UCSD Birds-200-2011 (200 species) from the official CUB_200_2011.tgz; labels of shape (N, 1).

    Reads root/CUB_200_2011/: images.txt ("<id> <class folder>/<file>.jpg"), image_class_labels.txt
    ("<id> <class 1..200>"), train_test_split.txt ("<id> <1: train, 0: test>"), classes.txt and images/.
    Missing or inconsistent files: RuntimeError, as torchvision's datasets raise.
    """

    base_folder = "CUB_200_2011"
    url = "https://data.caltech.edu/records/65de6-vxr72/files/CUB_200_2011.tgz"
    md5 = "97eceeb196236b17998738112f37df78"
    _NAME, _ITEMS = "cub200", ("files",)

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        self.root, self.train, self.transform = Path(root), train, transform
        folder = self.root / self.base_folder
        if download and not folder.is_dir() and not is_synthetic(self._NAME, root):
            download_and_extract_archive(self.url, str(self.root), md5=self.md5)
        paths = self._table(folder, "images.txt")
        classes = self._table(folder, "image_class_labels.txt")
        is_train = self._table(folder, "train_test_split.txt")
        names = self._table(folder, "classes.txt")
        if not paths.keys() == classes.keys() == is_train.keys():
            raise _corrupted(f"images.txt, image_class_labels.txt and train_test_split.txt in '{folder}' differ")
        if sorted(names, key=int) != [str(k) for k in range(1, 201)]:
            raise _corrupted(f"'{folder / 'classes.txt'}' does not list the classes 1..200")
        if not set(classes.values()) <= set(names) or not set(is_train.values()) <= {"0", "1"}:
            raise _corrupted(f"a class outside 1..200 or a split other than 0/1 in '{folder}'")
        ids = sorted((i for i in paths if is_train[i] == ("1" if train else "0")), key=int)
        self.classes = [names[str(k)].split(".", 1)[-1] for k in range(1, 201)]  # "001.Black_footed_Albatross"
        self.files = [folder / "images" / paths[i] for i in ids]
        self.labels = _one_label([int(classes[i]) - 1 for i in ids])
        _check_files(self.files, folder / "images.txt")

    @staticmethod
    def _table(folder: Path, name: str) -> dict[str, str]:
        """{first column: second column} of one of the dataset's two-column text files."""
        try:
            rows = [line.split(maxsplit=1) for line in (folder / name).read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as error:
            raise _corrupted(f"cannot read '{folder / name}' ({getattr(error, 'strerror', None) or error})") from None
        if not all(len(row) == 2 and row[0].isdigit() for row in rows) or len({r[0] for r in rows}) != len(rows):
            raise _corrupted(f"'{folder / name}' is not lines of '<id> <value>' with distinct ids")
        return {key: value.strip() for key, value in rows}

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as image:
            return image.convert("RGB")  # a few CUB images are greyscale


def _class_folders(folder: Path) -> list[str]:
    """The class folders of `folder` (train/ or test/), sorted by name (their numbers); hidden ones (.cache,
    .ipynb_checkpoints) are not classes."""
    if not folder.is_dir():
        root = folder.parent
        raise DatasetProblem(
            f"'{root}' has no {folder.name}/ folder: put the training images in {root / 'train'}/<class>/ "
            f"and the test images in {root / 'test'}/<class>/"
        )
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DatasetProblem(f"'{folder}' holds no class folder: put each class's images in {folder}/<class>/")
    return classes


def _image_files(folder: Path) -> list[Path]:
    """The image files below a class folder, at any depth, in ImageFolder's order (folder by folder, sorted by path,
    then by name): hidden files and folders skipped, links followed, a folder reached twice (a link back up) read
    once, files that are not images by their extension ignored."""
    found, seen, todo = [], set(), [folder]
    while todo:
        here = todo.pop()
        try:
            key = (here.stat().st_dev, here.stat().st_ino)
            entries = [entry for entry in os.scandir(here) if not entry.name.startswith(".")]
        except OSError:
            continue
        if key in seen:
            continue
        seen.add(key)
        found.append(
            (str(here), sorted(e.name for e in entries if not e.is_dir() and e.name.lower().endswith(IMG_EXTENSIONS)))
        )
        todo += [Path(entry.path) for entry in entries if entry.is_dir()]
    return [Path(here, name) for here, names in sorted(found) for name in names]


# What an image file ends with when it is whole: PNG's IEND chunk, JPEG's end-of-image marker.
WHOLE_ENDING = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}


def _image_problem(path: Path) -> str | None:
    """Why an image file cannot be trained on, from its header and its last bytes (no decoding): a broken link, empty,
    not an image, larger than PIL decodes (its decompression-bomb limit), truncated (PNG, JPEG); None: it can."""
    try:
        size = path.stat().st_size
    except OSError:
        return "a broken link" if path.is_symlink() else "unreadable"
    if not size:
        return "empty"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                kind, (width, height) = image.format, image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return f"larger than {Image.MAX_IMAGE_PIXELS:,} pixels"
    except (OSError, SyntaxError, ValueError):
        return "not an image"
    if width * height > Image.MAX_IMAGE_PIXELS:
        return f"larger than {Image.MAX_IMAGE_PIXELS:,} pixels ({width}x{height})"
    if kind in WHOLE_ENDING:
        with open(path, "rb") as file:
            file.seek(max(0, size - 1024))  # a JPEG may carry a few bytes after its end marker
            if WHOLE_ENDING[kind] not in file.read():
                return "truncated"
    return None


def check_images(folder: Path, files: list[Path]) -> None:
    """DatasetProblem naming how many of `files` (below `folder`) cannot be trained on, the first few and why."""
    bad = [(path, problem) for path in files if (problem := _image_problem(path))]
    if bad:
        shown = ", ".join(f"{path.relative_to(folder)} ({problem})" for path, problem in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DatasetProblem(
            f"{len(bad)} of the {len(files)} images in '{folder}' cannot be used: {shown}{more}; delete them or move "
            "them out of the folder"
        )


def _listed(names: set[str], most: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


class FolderDataset(_Dataset, torch.utils.data.Dataset):
    """One's own images: root/train/<class>/ or root/test/<class>/ (ImageFolder's layout and order); labels (N, 1).

    Classes are numbered by sorted folder name; train/ and test/ must have the same class folders, at least two,
    each with an image; hidden files and folders are skipped, links followed once, other files ignored. Every image
    is checked before training (check_images): one that cannot be read is refused with the rest (DatasetProblem).
    A missing root: RuntimeError, as for the other datasets.
    """

    _NAME, _ITEMS = "folder", ("samples", "targets")

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise RuntimeError(f"Dataset not found: there is no folder '{root}'")
        mine, other = (root / "train", root / "test") if train else (root / "test", root / "train")
        classes, other_classes = _class_folders(mine), _class_folders(other)
        if classes != other_classes:
            train_classes, test_classes = (classes, other_classes) if train else (other_classes, classes)
            only = {"train": set(train_classes) - set(test_classes), "test": set(test_classes) - set(train_classes)}
            differences = "; ".join(f"only in {split}/: {_listed(names)}" for split, names in only.items() if names)
            raise DatasetProblem(
                f"the class folders of '{root / 'train'}' and '{root / 'test'}' differ ({differences}); "
                "give both the same class folders"
            )
        if len(classes) < 2:
            raise DatasetProblem(
                f"'{mine}' holds one class folder ({classes[0]}); a classifier needs two or more: add a class folder"
            )
        files = {name: _image_files(mine / name) for name in classes}
        empty = [name for name in classes if not files[name]]
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise DatasetProblem(
                f"the class folder '{mine / empty[0]}' holds no image{more} (readable: "
                f"{' '.join(IMG_EXTENSIONS)}); add images or remove the folder"
            )
        self.classes, self.transform = classes, transform
        self.samples = [(str(path), label) for label, name in enumerate(classes) for path in files[name]]
        check_images(mine, [Path(path) for path, _ in self.samples])
        self.targets = [label for _, label in self.samples]
        self.labels = _one_label(self.targets)

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Image.Image:
        with Image.open(self.samples[index][0]) as image:
            return image.convert("RGB")


_DATASET_CLASSES = {
    cls._NAME: cls
    for cls in (CIFAR100, CIFAR10, SVHN, FashionMNIST, MNIST, OxfordIIITPet, Food101, CUB200, FolderDataset)
}


def _known(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name


def dataset_classes(name: str, root: str | Path) -> int:
    """The number of classes: NUM_CLASSES[name]; for "folder" the class folders of root/train (DatasetProblem if
    root/train is missing or holds none)."""
    if _known(name) == "folder":
        return len(_class_folders(Path(root) / "train"))
    return NUM_CLASSES[name]


def dataset_transforms(name: str, image_size: int) -> tuple[transforms.Compose, transforms.Compose]:
    """(train transform, test transform) for `name` at `image_size` pixels square.

    CIFAR and Fashion-MNIST at 32: TRAIN_TRANSFORM and TEST_TRANSFORM themselves; SVHN and MNIST the same without
    the flip (NO_FLIP: digits are not mirror-symmetric); a 32x32 dataset at another size resizes after the crop. The
    large-image datasets: ImageNet's RandomResizedCrop and flip for training, resize and centre crop (the 224/256
    ratio) for testing.
    """
    if not (isinstance(image_size, int) and image_size >= 1):
        raise ValueError(f"image_size must be a positive integer (got {image_size!r})")
    if _known(name) in SMALL_IMAGE_DATASETS:
        if image_size == 32 and name not in NO_FLIP:
            return TRAIN_TRANSFORM, TEST_TRANSFORM
        flip = [transforms.RandomHorizontalFlip()] if name not in NO_FLIP else []
        resize = [transforms.Resize(image_size)] if image_size != 32 else []
        tensor = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        train = transforms.Compose([transforms.RandomCrop(32, padding=4), *flip, *resize, *tensor])
        return train, (transforms.Compose([*resize, *tensor]) if resize else TEST_TRANSFORM)
    tensor = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *tensor])
    resize = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    return train, transforms.Compose([*resize, *tensor])


def dataset_folder(name: str, root: str | Path) -> Path:
    """Where the dataset's files live under `root` (root itself for "folder"), for messages."""
    return Path(root) / DATASET_FOLDERS[_known(name)]


def _markers(name: str, root: str | Path) -> list[Path]:
    """Where a marker of a dataset not downloaded can be: make_synthetic's, and write_subset's (real images)."""
    return [Path(root) / SYNTHETIC_MARKERS[name], Path(root) / f"{DATASET_FOLDERS[name]}.subset.json"]


def is_synthetic(name: str, root: str | Path) -> bool:
    """Whether make_synthetic (or make_synthetic_cifar100) wrote the dataset under `root`: its marker is there."""
    return (Path(root) / SYNTHETIC_MARKERS[_known(name)]).is_file()


def open_dataset(name: str, root: str | Path, train: bool, transform, download: bool):
    """The train or test split of dataset `name` under `root`; items ``(image, labels)``.

    Raises what torchvision raises: RuntimeError for a dataset not found or corrupted, URLError/OSError for a
    failed download, ImportError for SVHN without scipy; DatasetProblem for a "folder" laid out wrongly.
    A synthetic dataset is never downloaded over; "folder" ignores `download`.
    """
    return _DATASET_CLASSES[_known(name)](root, train=train, transform=transform, download=download)


# --------------------------------------------------------------------------- synthetic datasets in each real layout


def make_synthetic(name: str, root: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write a small, learnable dataset `name` under `root` in the real dataset's on-disk layout; returns root.

    Classes cycle, so every class appears once n_train reaches the class count. A marker (SYNTHETIC_MARKERS)
    makes is_synthetic true and keeps open_dataset from downloading over it; for the 32x32 sets it holds
    the md5 torchvision checks. On any error what this call made is removed again (_write_synthetic).
    cifar100: make_synthetic_cifar100.
    """
    if _known(name) == "cifar100":
        return make_synthetic_cifar100(root, n_train=n_train, n_test=n_test, seed=seed)
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must not be negative (got {n_train}, {n_test})")
    files = _SYNTHETIC_WRITERS[name](np.random.default_rng(seed), n_train, n_test)
    return _write_synthetic(name, root, files, {"dataset": name, "train": n_train, "test": n_test, "seed": seed})


def make_synthetic_cifar100(root: str | Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> Path:
    """Write a small CIFAR-100 in the real archive's on-disk format under ``root``.

    Each image is its class prototype (a superclass colour plus a smooth fine-class pattern)
    plus noise, so a network can learn both levels, also after random crops and flips. Fine
    and coarse labels follow the real fine -> superclass map. Returns ``root``.

    On any error (a full disk, running out of memory, Ctrl-C) the folders this call made and the files
    it wrote are removed again before the error propagates: no half-written dataset, no empty folder.
    """
    rng = np.random.default_rng(seed)
    # Smooth 8x8 patterns upsampled to 32x32 survive random crops and flips. Each superclass has
    # a colour, each fine class a pattern on top of it: both levels of the hierarchy are learnable.
    coarse_colour = rng.uniform(40, 215, size=(20, 3, 1, 1))
    fine_pattern = rng.uniform(-40, 40, size=(100, 3, 8, 8))
    prototypes = np.repeat(np.repeat(fine_pattern, 4, axis=2), 4, axis=3) + coarse_colour[list(FINE_TO_COARSE)]

    def split(n: int) -> bytes:
        fine = _cycled(n, 100, rng)
        images = prototypes[fine] + rng.normal(0, 25, size=(n, 3, 32, 32))
        content = {
            "filenames": [f"synthetic_{i:06d}.png" for i in range(n)],
            "batch_label": "synthetic",
            "fine_labels": fine.tolist(),
            "coarse_labels": [FINE_TO_COARSE[k] for k in fine],
            "data": np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072),
        }
        return pickle.dumps(content, protocol=2)

    # Everything is made in memory before the first folder is: running out of memory leaves nothing on disk.
    meta = {"fine_label_names": FINE_LABEL_NAMES, "coarse_label_names": COARSE_LABEL_NAMES}
    files = [("train", split(n_train)), ("test", split(n_test)), ("meta", pickle.dumps(meta, protocol=2))]
    return _write_synthetic("cifar100", root, files)


def _write_synthetic(
    name: str, root: str | Path, files: Iterable[tuple[str, bytes]], info: dict | None = None, marker: str = ""
) -> Path:
    """Write `files` (path under the dataset's folder, content), then the dataset's marker under `root` (`marker`:
    another name than make_synthetic's): for the 32x32 sets the md5 of each file (what torchvision checks) with
    `info`, else `info`. On any error, removes what it made."""
    root = Path(root)
    folder = dataset_folder(name, root)
    checked = name in SMALL_IMAGE_DATASETS
    made: list[Path] = []  # folders and files this call has made, in order
    try:
        md5 = {}
        for relative, content in files:
            path = folder / relative
            if not path.parent.is_dir():
                _make_folders(path.parent, made)
            with open(path, "wb") as f:
                made.append(path)  # opened for writing, its old content (if any) is gone: ours to remove
                f.write(content)
            if checked:
                md5[path.name] = _md5(path)
        _make_folders(root, made)  # n_train = n_test = 0 for "folder" writes no image
        marker = root / (marker or SYNTHETIC_MARKERS[name])
        with open(marker, "w") as f:
            made.append(marker)
            record = {**md5, **(info or {})} if checked and name in IDX_MD5 else md5 if checked else info
            f.write(json.dumps(record, indent=1) + "\n")
    except BaseException:
        _remove_made(made)
        raise
    return root


def _make_folders(folder: Path, made: list[Path]) -> None:
    """mkdir -p `folder`, appending to `made` each folder made, outermost first (mkdir -p does not say which)."""
    missing = list(itertools.takewhile(lambda path: not path.exists(), (folder, *folder.parents)))
    for path in reversed(missing):
        path.mkdir()
        made.append(path)


def _remove_made(made: list[Path]) -> None:
    """Remove what a failed _write_synthetic made, newest first (files before their folders). A folder is removed
    only when empty, so that what someone else put there meanwhile stays; a removal that fails is skipped, so
    that the caller sees the error that stopped the writing."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()


def _cycled(n: int, num_classes: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Labels 0, 1, ..., num_classes - 1, 0, 1, ...: each class once n reaches num_classes; shuffled by `rng` if any."""
    labels = np.arange(n) % num_classes
    if rng is not None:
        rng.shuffle(labels)
    return labels


def _small_images(rng: np.random.Generator, num_classes: int, labels: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 (N, 32, 32, 3) images for each array of `labels`: make_synthetic_cifar100's recipe, a class colour
    plus a smooth 8x8 class pattern (survives random crops) plus noise; made in chunks to bound the memory."""
    colour = rng.uniform(40, 215, size=(num_classes, 1, 1, 3))
    pattern = rng.uniform(-40, 40, size=(num_classes, 8, 8, 3))
    prototypes = np.repeat(np.repeat(pattern, 4, axis=1), 4, axis=2) + colour
    out = []
    for split in labels:
        chunks = [
            np.clip(prototypes[part] + rng.normal(0, 25, size=(len(part), 32, 32, 3)), 0, 255).astype(np.uint8)
            for part in np.array_split(split, max(1, -(-len(split) // 10_000)))
        ]
        out.append(np.concatenate(chunks))
    return out


class _LargeImages:
    """Encoded images of varying, non-square sizes (36-56 x 40-64 pixels): a class colour plus a smooth 4x4
    class pattern, resized to the image, plus noise. Learnable at any crop size, and the resize path runs."""

    def __init__(self, rng: np.random.Generator, num_classes: int, image_format: str = "JPEG"):
        self.rng, self.format = rng, image_format
        colour = rng.uniform(40, 215, size=(num_classes, 1, 1, 3))
        self.prototypes = np.clip(colour + rng.uniform(-50, 50, size=(num_classes, 4, 4, 3)), 0, 255).astype(np.uint8)

    def __call__(self, label: int) -> bytes:
        height, width = (int(k) for k in self.rng.integers((36, 40), (57, 65)))
        width += width == height  # never square
        base = Image.fromarray(self.prototypes[label]).resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(base, dtype=np.float64) + self.rng.normal(0, 20, size=(height, width, 3))
        buffer = io.BytesIO()
        options = {"quality": 90} if self.format == "JPEG" else {}
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format=self.format, **options)
        return buffer.getvalue()


def _lines(lines: list[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


def _synthetic_cifar10(rng: np.random.Generator, n_train: int, n_test: int) -> Iterator[tuple[str, bytes]]:
    """CIFAR-10's pickles: data_batch_1..5 (the training images split in five), test_batch, batches.meta."""
    labels = [_cycled(n_train, 10, rng), _cycled(n_test, 10, rng)]
    train, test = _small_images(rng, 10, labels)

    def batch(images: np.ndarray, classes: np.ndarray, name: str) -> bytes:
        content = {
            "batch_label": name,
            "labels": classes.tolist(),
            "data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),  # rows of R, G, B planes
            "filenames": [f"synthetic_{i:06d}.png" for i in range(len(images))],
        }
        return pickle.dumps(content, protocol=2)

    for k, part in enumerate(np.array_split(np.arange(n_train), 5), 1):
        yield f"data_batch_{k}", batch(train[part], labels[0][part], f"training batch {k} of 5")
    yield "test_batch", batch(test, labels[1], "testing batch 1 of 1")
    meta = {"label_names": CIFAR10_LABEL_NAMES, "num_cases_per_batch": -(-n_train // 5), "num_vis": 3072}
    yield "batches.meta", pickle.dumps(meta, protocol=2)


def _synthetic_svhn(rng: np.random.Generator, n_train: int, n_test: int) -> Iterator[tuple[str, bytes]]:
    """SVHN's cropped-digit .mat files: X uint8 (32, 32, 3, N), y uint8 (N, 1) with 10 for the digit 0."""
    import scipy.io  # SVHN's optional dependency, as in torchvision: imported before anything is written

    labels = [_cycled(n_train, 10, rng), _cycled(n_test, 10, rng)]
    for filename, classes, images in zip(SVHN_FILES, labels, _small_images(rng, 10, labels)):
        buffer = io.BytesIO()
        y = np.where(classes == 0, 10, classes).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(buffer, {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": y})
        yield filename, buffer.getvalue()


def _synthetic_pet(rng: np.random.Generator, n_train: int, n_test: int) -> Iterator[tuple[str, bytes]]:
    """The two Pet archives extracted: images/<Breed_Name>_<k>.jpg, annotations/{trainval,test,list}.txt with
    lines "Image CLASS-ID SPECIES BREED-ID" (species 1: cat, 2: dog; breed ids count within a species)."""
    image = _LargeImages(rng, len(PET_BREEDS))
    counts = [0] * len(PET_BREEDS)
    everything = []
    for split, n in (("trainval", n_train), ("test", n_test)):
        lines = []
        for label in _cycled(n, len(PET_BREEDS)):
            breed = PET_BREEDS[label]
            counts[label] += 1
            cat = breed[0].isupper()
            breed_id = [b for b in PET_BREEDS if b[0].isupper() == cat].index(breed) + 1
            lines.append(f"{breed}_{counts[label]} {label + 1} {1 if cat else 2} {breed_id}")
            yield f"images/{breed}_{counts[label]}.jpg", image(label)
        yield f"annotations/{split}.txt", _lines(lines)
        everything += lines
    header = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog"]
    header += ["#BREED ID: 1-12:Cat 1-25:Dog", "#All images with 1st letter as capital are cat images"]
    header += ["#images with small first letter are dog images"]
    yield "annotations/list.txt", _lines(header + sorted(everything))


def _synthetic_food101(rng: np.random.Generator, n_train: int, n_test: int) -> Iterator[tuple[str, bytes]]:
    """The Food-101 archive extracted: images/<class>/<id>.jpg and meta/ with {train,test}.{json,txt}, classes.txt
    and labels.txt. Every class is a key of each json, as in the real files (torchvision numbers the keys)."""
    image = _LargeImages(rng, len(FOOD101_CLASSES))
    number = 100_000
    for split, n in (("train", n_train), ("test", n_test)):
        listed: dict[str, list[str]] = {name: [] for name in FOOD101_CLASSES}
        for label in _cycled(n, len(FOOD101_CLASSES)):
            number += 1
            listed[FOOD101_CLASSES[label]].append(f"{FOOD101_CLASSES[label]}/{number}")
            yield f"images/{FOOD101_CLASSES[label]}/{number}.jpg", image(label)
        yield f"meta/{split}.json", json.dumps(listed).encode()
        yield f"meta/{split}.txt", _lines([path for paths in listed.values() for path in paths])
    yield "meta/classes.txt", _lines(FOOD101_CLASSES)
    yield "meta/labels.txt", _lines([name.replace("_", " ").capitalize() for name in FOOD101_CLASSES])


def _synthetic_cub200(rng: np.random.Generator, n_train: int, n_test: int) -> Iterator[tuple[str, bytes]]:
    """CUB_200_2011.tgz's layout: images/<NNN.Name>/<file>.jpg and the id-keyed lists, sorted by class as the
    real ones are."""
    image = _LargeImages(rng, 200)
    names = [f"Synthetic_Bird_{k:03d}" for k in range(1, 201)]
    folders = [f"{k:03d}.{name}" for k, name in enumerate(names, 1)]
    entries = [(c, 1) for c in _cycled(n_train, 200)] + [(c, 0) for c in _cycled(n_test, 200)]
    entries.sort(key=lambda entry: entry[0])
    paths, classes, split = [], [], []
    for image_id, (label, is_train) in enumerate(entries, 1):
        path = f"{folders[label]}/{names[label]}_{image_id:04d}.jpg"
        yield f"images/{path}", image(label)
        paths.append(f"{image_id} {path}")
        classes.append(f"{image_id} {label + 1}")
        split.append(f"{image_id} {is_train}")
    yield "images.txt", _lines(paths)
    yield "image_class_labels.txt", _lines(classes)
    yield "train_test_split.txt", _lines(split)
    yield "classes.txt", _lines([f"{k} {folder}" for k, folder in enumerate(folders, 1)])


def _synthetic_folder(rng: np.random.Generator, n_train: int, n_test: int) -> Iterator[tuple[str, bytes]]:
    """One's own images as FolderDataset reads them: train/<class>/<k>.png and test/<class>/<k>.png."""
    image = _LargeImages(rng, len(SYNTHETIC_FOLDER_CLASSES), "PNG")
    for split, n in (("train", n_train), ("test", n_test)):
        for k, label in enumerate(_cycled(n, len(SYNTHETIC_FOLDER_CLASSES))):
            yield f"{split}/{SYNTHETIC_FOLDER_CLASSES[label]}/{k:05d}.png", image(label)


def _idx(array: np.ndarray) -> bytes:
    """An idx file, MNIST's format: two zero bytes, the type (8: unsigned byte) and the number of dimensions, each
    dimension's size (big-endian), then the bytes; compressed as the published files are."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), mtime=0)


def _synthetic_idx(rng: np.random.Generator, n_train: int, n_test: int) -> Iterator[tuple[str, bytes]]:
    """MNIST's and Fashion-MNIST's raw/ folder: the four .gz idx files of 28x28 grayscale images, a class's smooth
    7x7 pattern (survives random crops) scaled up, plus noise, on a black border, and their labels."""
    pattern = rng.uniform(60, 255, size=(10, 7, 7))
    prototypes = np.pad(np.repeat(np.repeat(pattern, 3, axis=1), 3, axis=2), ((0, 0), (3, 4), (3, 4)))
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = _cycled(n, 10, rng)
        images = np.clip(prototypes[labels] + rng.normal(0, 25, size=(n, 28, 28)), 0, 255)
        yield f"raw/{prefix}-images-idx3-ubyte.gz", _idx(images.astype(np.uint8))
        yield f"raw/{prefix}-labels-idx1-ubyte.gz", _idx(labels)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (.gz or not) as a uint8 array of its shape."""
    data = path.read_bytes()
    data = gzip.decompress(data) if path.suffix == ".gz" else data
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_subset(name: str, source: str | Path, root: str | Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Real images in less time: n_train training and n_test test images of MNIST or Fashion-MNIST, as many of each
    class as the counts allow (one more for the first classes where 10 does not divide them), drawn with `seed`
    from `source` (the four files, .gz or not: Debian's package, or torchvision's raw/ folder), each checked by its
    content's md5 (IDX_MD5), written in the real layout under root/<FashionMNIST or MNIST>/raw/ with a marker naming
    the source. DatasetProblem for a source that is not the real dataset."""
    arrays = []
    for file, expected in zip(IDX_FILES, IDX_MD5[name]):
        path = next((p for p in (Path(source, f"{file}.gz"), Path(source, file)) if p.is_file()), None)
        if path is None:
            raise DatasetProblem(
                f"'{source}' holds no {file}.gz (nor {file}): give the folder of {DATASET_NAMES[name]}'s four files"
            )
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        if hashlib.md5(data).hexdigest() != expected:
            raise DatasetProblem(f"'{path}' is not {DATASET_NAMES[name]}'s {file} (its md5 differs)")
        arrays.append(read_idx(path))
    rng = np.random.default_rng(seed)

    def files():
        for (images, labels), n, prefix in zip((arrays[:2], arrays[2:]), (n_train, n_test), ("train", "t10k")):
            counts = [n // 10 + (k < n % 10) for k in range(10)]
            chosen = np.sort(
                np.concatenate(
                    [rng.choice(np.flatnonzero(labels == k), c, replace=False) for k, c in enumerate(counts)]
                )
            )
            yield f"raw/{prefix}-images-idx3-ubyte.gz", _idx(images[chosen])
            yield f"raw/{prefix}-labels-idx1-ubyte.gz", _idx(labels[chosen])

    info = {"subset of": str(source), "train": n_train, "test": n_test, "seed": seed}
    return _write_synthetic(name, root, files(), info, marker=_markers(name, root)[1].name)


_SYNTHETIC_WRITERS = {"cifar10": _synthetic_cifar10, "svhn": _synthetic_svhn, "oxford-pet": _synthetic_pet}
_SYNTHETIC_WRITERS |= {"fashion-mnist": _synthetic_idx, "mnist": _synthetic_idx}
_SYNTHETIC_WRITERS |= {"food101": _synthetic_food101, "cub200": _synthetic_cub200, "folder": _synthetic_folder}


def crop_flip_indices(
    n: int, generator: torch.Generator, device: torch.device, size: int = 32, padding: int = 4, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices into a zero-padded image for a random crop then a random flip.

    One crop offset in [0, 2 * padding] per axis and one fair coin per image, as
    RandomCrop(size, padding) followed by RandomHorizontalFlip draw them; ``flip=False``: the crop
    alone, as RandomCrop draws it (no coin is drawn). Returns rows (n, size) and cols (n, size).
    """
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    ramp = torch.arange(size, device=device)
    rows = offsets[:, :1] + ramp
    if not flip:
        return rows, offsets[:, 1:] + ramp
    flipped = torch.rand(n, generator=generator, device=device) < 0.5
    cols = offsets[:, 1:] + torch.where(flipped[:, None], size - 1 - ramp, ramp)
    return rows, cols


def augment_on_device(
    images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip (unless ``flip=False``) of uint8 (N, 3, H, W) images, per
    image. Zero padding happens on the uint8 image, before normalisation, as in torchvision."""
    n, _, size, _ = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows, cols = crop_flip_indices(n, generator, images.device, size, padding, flip)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexing puts the indexed dims first: (N, H, W, C) -> back to (N, C, H, W).
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@functools.cache
def channel_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as (1, 3, 1, 1) tensors on `device`, made once: a copy from the host per batch
    would make the host wait for the GPU every batch."""
    return torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, as ToTensor() then Normalize(MEAN, STD)."""
    mean, std = channel_statistics(images.device)
    return (images.float() / 255 - mean) / std


class DeviceLoader:
    """The whole dataset as one uint8 tensor on ``device``; shuffles and augments there.

    Yields ``(images, labels)`` batches like a DataLoader over CIFAR100 with TRAIN_TRANSFORM
    (``augment=True``) or TEST_TRANSFORM (``augment=False``); any of SMALL_IMAGE_DATASETS (``data``,
    uint8 (N, 32, 32, 3)) will do. ``flip=False`` augments without the horizontal flip (SVHN's digits).
    Its randomness comes from its own ``generator`` (on ``device``), whose state a checkpoint saves.
    """

    def __init__(
        self, dataset, batch_size: int, device: torch.device, shuffle: bool, augment: bool, seed: int, flip: bool = True
    ):
        self.images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = dataset.labels.to(device)
        self.batch_size, self.shuffle, self.augment, self.flip = batch_size, shuffle, augment, flip
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        device = self.images.device
        order = torch.arange(n, device=device)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device=device)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if self.augment:
                images = augment_on_device(images, self.generator, flip=self.flip)
            yield normalize(images), self.labels[index]


# --------------------------------------------------------------------------- a run's data: its datasets and loaders


def default_image_size(dataset: str) -> int:
    """--image-size when not given: the 32x32 datasets' own size, 224 (ImageNet's) for the others."""
    return 32 if dataset in SMALL_IMAGE_DATASETS else 224


def primary_labels(labels: torch.Tensor, cfg) -> torch.Tensor:
    """A batch's primary-task labels (`cfg`: the run's settings, .dataset and .primary_level): the hierarchy's level
    primary_level on CIFAR-100, the dataset's classes (labels' only column) on the others."""
    return labels[:, level_index(cfg.primary_level) if cfg.dataset == "cifar100" else 0]


def stratified_fraction(classes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n) of each class's n images (at least one), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(classes):
        members = np.flatnonzero(classes == label)
        kept.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(kept))


def load_datasets(cfg):
    """The train set (with its augmentation) and the test set of a run's --dataset (`cfg`: its settings), the train
    set cut to --train-fraction. A dataset that is missing, corrupt or cannot be downloaded is a DatasetProblem
    whose one line says what to do."""
    name, folder = DATASET_NAMES[cfg.dataset], dataset_folder(cfg.dataset, cfg.data_root)
    train_transform, test_transform = dataset_transforms(cfg.dataset, cfg.image_size)
    # The CIFAR archives hold both splits: the train set's download fetches the test set too.
    test_download = cfg.download and cfg.dataset not in ("cifar100", "cifar10")
    try:
        train_set = open_dataset(cfg.dataset, cfg.data_root, True, train_transform, cfg.download)
        test_set = open_dataset(cfg.dataset, cfg.data_root, False, test_transform, test_download)
    except ImportError as error:
        raise DatasetProblem(
            f"--dataset {cfg.dataset} needs the {error.name or 'missing'} package to read its files: "
            "pip install -r requirements-extras.txt"
        ) from None
    except (URLError, OSError) as error:
        raise DatasetProblem(
            f"could not download {name} into '{cfg.data_root}' ({error}); download it yourself and extract it "
            f"there, or point --data-root at a folder that holds {folder.name}/"
        ) from None
    except RuntimeError:
        again = "" if cfg.dataset == "cifar100" else f" --dataset {cfg.dataset}"
        if is_synthetic(cfg.dataset, cfg.data_root):  # never downloaded over: it is made again
            hint = f"it is synthetic: delete it and run python create_dataset.py --synthetic {cfg.data_root}{again}"
        elif cfg.dataset == "folder":
            hint = "it needs train/<class>/ and test/<class>/ folders of images"
        elif not cfg.download:
            hint = f"run without --no-download to fetch it ({DOWNLOAD_SIZES[cfg.dataset]})"
        else:
            hint = "delete that folder to download it again"
        raise DatasetProblem(
            f"{name} not found or corrupted in '{folder}'; {hint}, or point --data-root elsewhere"
        ) from None
    if cfg.train_fraction < 1:  # stratified by the finest labels, so every level keeps its class balance
        train_set = train_set.subset(stratified_fraction(train_set.labels[:, -1].numpy(), cfg.train_fraction, cfg.seed))
    return train_set, test_set


@dataclasses.dataclass
class Loaders:
    """A run's batches: train, test, the developing set held out of training (or None), and auxiliary train sets'
    (each shuffled by its own generator). Every shuffled loader carries its RNG as `.generator`."""

    train: object
    test: object
    dev: object | None = None
    auxiliary: list = dataclasses.field(default_factory=list)


def usable_cpus() -> int:
    """The CPUs this process may use (its affinity, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """The CPUs this process may use, at most 4: more would only make the DataLoader warn."""
    return min(4, usable_cpus())


INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore_interrupts(worker_id: int = 0) -> None:
    """A loader worker's start: a terminal's Ctrl-C or hang-up reaches the whole process group, and the run, not its
    workers, handles them (it stops the workers). The run starts its workers with these signals blocked (see
    experiment.batches), so none arrives before this; a pending one is dropped here. A broken connection to the run
    in a worker's resource-sharer thread, as the run stops, is not printed."""
    for interrupt in INTERRUPTS:
        signal.signal(interrupt, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)
    # A stopping run closes its workers' connections while a worker's resource-sharer thread (multiprocessing's, which
    # hands the run a batch's shared memory) may be writing to one; that thread reports its errors through
    # sys.excepthook. A broken pipe there says only that the run stopped reading: not a traceback in the run's output.
    report = sys.excepthook

    def quiet_when_the_run_stopped_reading(kind, error, traceback) -> None:
        if not issubclass(kind, (BrokenPipeError, ConnectionResetError)):
            report(kind, error, traceback)

    sys.excepthook = quiet_when_the_run_stopped_reading


def make_loaders(cfg, device: torch.device, train_set, test_set, dev_set=None, auxiliary_sets=()) -> Loaders:
    """Batches of (images, labels) of a run's datasets (`cfg`: its settings): the train and auxiliary sets augmented
    and shuffled, the developing set shuffled, the test set in order. On the device (DeviceLoader) with --data-path
    device, or auto on CUDA for a 32x32 dataset at 32; else torchvision's DataLoader with --workers."""
    smallest = min([len(train_set), *(len(s) for s in auxiliary_sets)])
    if cfg.batch_size > smallest:
        raise DatasetProblem(
            f"--batch-size {cfg.batch_size} is more than the {smallest} training image{'s' * (smallest != 1)}"
            f"{' of the smallest training set' if auxiliary_sets else ''}; choose at most {smallest}"
        )
    fits = cfg.dataset in SMALL_IMAGE_DATASETS and cfg.image_size == 32
    on_device = cfg.data_path == "device" or (cfg.data_path == "auto" and device.type == "cuda" and fits)
    flip = cfg.dataset not in NO_FLIP

    def loader(dataset, shuffle: bool, augment: bool, seed: int = cfg.seed):
        if on_device:
            return DeviceLoader(dataset, cfg.batch_size, device, shuffle=shuffle, augment=augment, seed=seed, flip=flip)
        # Workers are re-seeded from `generator` every epoch (no persistent workers) so a resumed run repeats exactly.
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        workers = default_workers() if cfg.workers is None else cfg.workers
        return torch.utils.data.DataLoader(
            dataset,
            cfg.batch_size,
            shuffle,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            generator=generator,
            worker_init_fn=ignore_interrupts,
        )

    dev = loader(dev_set, shuffle=True, augment=False) if dev_set is not None else None
    # Each auxiliary set its own stream of shuffles, not the train loader's seed (equal sizes would shuffle alike).
    seeds = [int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0]) for i in range(1, len(auxiliary_sets) + 1)]
    auxiliary = [loader(s, shuffle=True, augment=True, seed=seed) for s, seed in zip(auxiliary_sets, seeds)]
    return Loaders(
        loader(train_set, shuffle=True, augment=True), loader(test_set, shuffle=False, augment=False), dev, auxiliary
    )


_FOLDER_MOST = 10_000  # images per split of a synthetic "folder" dataset (the others: REAL_SIZES)


def _default_sizes(name: str) -> tuple[int, int]:
    """(train, test) images written when --train/--test are not given: a 32x32 set's own sizes (it is held in
    memory anyway); for the others 10 and 5 per class, enough to try a script in minutes."""
    if name in SMALL_IMAGE_DATASETS:
        return REAL_SIZES[name]
    classes = NUM_CLASSES.get(name, len(SYNTHETIC_FOLDER_CLASSES))
    return 10 * classes, 5 * classes


def _folder(text: str) -> Path:
    """--synthetic's value. An empty path would mean the current folder, never what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no folder; give the folder to write into")
    return Path(text)


def _sizes_help(split: int) -> str:
    defaults = "; ".join(f"{name} {_default_sizes(name)[split]:,}" for name in DATASETS)
    most = "; ".join(f"{name} {sizes[split]:,}" for name, sizes in REAL_SIZES.items())
    per_class = (10, 5)[split]
    return (
        f"default: {defaults} ({per_class} per class beyond the 32x32 sets). At most the real set's size: {most}; "
        f"folder {_FOLDER_MOST:,}"
    )


def _command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a synthetic dataset in the real dataset's on-disk format (learnable images: a class "
        "colour and pattern plus noise), to try the scripts without the download: python model_vgg_maxl.py "
        "--data-root DIR --no-download (with --dataset NAME for a dataset other than cifar100)",
        allow_abbrev=False,
    )
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # one line, no usage dump
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--synthetic", type=_folder, metavar="DIR", help="folder to write it into")
    where.add_argument(
        "--subset",
        type=_folder,
        metavar="DIR",
        help="instead: real images, --train and --test of them (as many of each class as they allow) drawn with --seed "
        "from --source, written into DIR in the real layout (fashion-mnist and mnist)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        metavar="SRC",
        help="--subset: the folder of the four .gz files, e.g. /usr/share/datasets/fashion-mnist (Debian's "
        "dataset-fashion-mnist) or DIR/FashionMNIST/raw (torchvision's download)",
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="cifar100",
        help="which dataset's layout (default: cifar100); folder: DIR/{train,test}/<class>/*.png with "
        f"{len(SYNTHETIC_FOLDER_CLASSES)} classes, as one's own images are laid out",
    )
    parser.add_argument("--train", type=int, help=f"training images; {_sizes_help(0)}")
    parser.add_argument("--test", type=int, help=f"test images; {_sizes_help(1)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and labels")
    return parser


def _refusal(args: argparse.Namespace) -> str | None:
    """Why the parsed command line cannot be run, or None. Checked before anything is written."""
    for name, most in zip(("train", "test"), REAL_SIZES.get(args.dataset, (_FOLDER_MOST, _FOLDER_MOST))):
        count = getattr(args, name)
        if count < 1:
            return f"--{name} must be at least 1 (got {count})"
        # All 32x32 images are made in memory first (3.2 GB at CIFAR-100's own sizes): a size beyond the real
        # set's is refused here rather than left to run out of memory; no script needs more images than that.
        if count > most:
            if args.dataset == "folder":
                return f"--{name} must be at most {most} for --dataset {args.dataset} (got {count})"
            return (
                f"--{name} must be at most {most}, the size of {DATASET_NAMES[args.dataset]}'s {name} set (got {count})"
            )
    if not 0 <= args.seed < 2**32:
        return f"--seed must be between 0 and {2**32 - 1}"
    if args.subset and (args.dataset not in IDX_MD5 or args.source is None):
        return f"--subset takes --dataset {' or '.join(IDX_MD5)} and --source, the folder of its four files"
    return None


def main(argv: list[str] | None = None) -> None:
    """python create_dataset.py --synthetic DIR [--dataset NAME] [--train N] [--test M]: a synthetic dataset for
    trying the scripts; --subset DIR --source SRC: real images, fewer. A refusal is one line on stderr and exit code
    2, with nothing written."""
    parser = _command_line()
    args = parser.parse_args(argv)
    defaults = _default_sizes(args.dataset)
    args.train = defaults[0] if args.train is None else args.train
    args.test = defaults[1] if args.test is None else args.test
    if refusal := _refusal(args):
        parser.exit(2, f"error: {refusal}\n")
    root = args.synthetic or args.subset
    folder = dataset_folder(args.dataset, root)
    # The folder dataset is the root itself: what must not be there yet is its train/ and test/.
    targets = [folder / "train", folder / "test"] if args.dataset == "folder" else [folder]
    try:
        for target in targets:
            if target.exists():
                parser.exit(2, f"error: '{target}' exists already; choose another folder\n")
        if args.subset:
            write_subset(args.dataset, args.source, root, n_train=args.train, n_test=args.test, seed=args.seed)
        else:
            make_synthetic(args.dataset, root, n_train=args.train, n_test=args.test, seed=args.seed)
    except DatasetProblem as error:
        parser.exit(2, f"error: {error}\n")
    except OSError as error:  # a folder not writable, a full disk, a name too long: make_synthetic cleaned up
        parser.exit(
            2,
            f"error: cannot write to '{root}' ({error.strerror or error}); nothing was left behind; "
            "choose another folder\n",
        )
    except MemoryError:
        parser.exit(
            2,
            f"error: not enough memory to make {args.train} train and {args.test} test images; nothing was "
            "left behind; ask for fewer with --train and --test\n",
        )
    except ImportError as error:  # SVHN's .mat files need scipy; it is imported before anything is written
        parser.exit(2, f"error: writing SVHN's .mat files needs scipy ({error}); pip install scipy\n")
    print(f"wrote {args.train} train and {args.test} test images to {folder}")


if __name__ == "__main__":
    main()
