"""CIFAR-100 with the 4-level label hierarchy of MAXL (Liu, Davison, Johns, NeurIPS 2019).

Every image carries four labels, coarse to fine: 3, 10, 20 and 100 classes. The 20 classes
are CIFAR-100's superclasses (``coarse_labels`` in the archive), the 100 its fine classes;
the 10- and 3-class levels group the superclasses further, as in the paper's Appendix A.

    from create_dataset import CIFAR100, TRAIN_TRANSFORM
    train_set = CIFAR100("dataset", train=True, transform=TRAIN_TRANSFORM, download=True)
    image, labels = train_set[0]      # labels[k], k = 0, 1, 2, 3: the 3-, 10-, 20-, 100-class label

Also here: ``make_synthetic_cifar100`` (a small, learnable dataset in the archive's exact
on-disk format, for tests and smoke runs; ``python create_dataset.py --synthetic DIR --train N --test M``
writes one from the command line) and ``DeviceLoader`` (the whole dataset as one
uint8 tensor on the GPU, augmented there, for fast CUDA runs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import itertools
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms
from torchvision.datasets.utils import check_integrity

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

SYNTHETIC_MARKER = "cifar-100-python.synthetic.json"
"""Written beside ``cifar-100-python/`` by make_synthetic_cifar100: the md5 of each file."""
SYNTHETIC_FILES = ("train", "test", "meta")
"""The files of ``cifar-100-python/`` whose md5 the marker holds."""

CIFAR100_SIZES = {"train": 50_000, "test": 10_000}
"""Images in CIFAR-100's train and test sets: the most the command line writes."""


def level_index(num_classes: int) -> int:
    """Column of the label tensor holding the level with ``num_classes`` classes."""
    return LEVELS.index(num_classes)


def coarser_class(label: int, level: int, coarser_level: int) -> int:
    """The class at `coarser_level` that contains class `label` of `level` (levels as class counts: 3, 10, 20, 100)."""
    maps = {100: FINE_TO_COARSE, 20: COARSE_TO_10, 10: TEN_TO_3}
    while level != coarser_level:
        label, level = maps[level][label], LEVELS[LEVELS.index(level) - 1]
    return label


def hierarchy_psi(primary_level: int, aux_level: int) -> list[int]:
    """psi[i] = the number of classes of the finer `aux_level` inside class i of `primary_level`."""
    if LEVELS.index(aux_level) <= LEVELS.index(primary_level):
        raise ValueError(f"aux_level {aux_level} is not finer than primary_level {primary_level}")
    psi = [0] * primary_level
    for label in range(aux_level):
        psi[coarser_class(label, aux_level, primary_level)] += 1
    return psi


def hierarchy_labels(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """(N, 4) int64 labels [3, 10, 20, 100 classes] from fine labels and archive superclasses."""
    coarse = np.asarray(coarse, dtype=np.int64)
    ten = np.asarray(COARSE_TO_10, dtype=np.int64)[coarse]
    three = np.asarray(TEN_TO_3, dtype=np.int64)[ten]
    return np.stack([three, ten, coarse, np.asarray(fine, dtype=np.int64)], axis=1)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _marker_checksums(marker: Path) -> dict[str, str]:
    """The md5 of each of SYNTHETIC_FILES, as make_synthetic_cifar100 wrote them into `marker`.

    A marker that does not hold them leaves nothing to check the files against: the folder is corrupt, and
    RuntimeError is what torchvision raises for a corrupt folder (the scripts say "not found or corrupted").
    """
    try:
        md5 = json.loads(marker.read_text())
    except ValueError:  # not JSON, or not even text: JSONDecodeError and UnicodeDecodeError are ValueErrors
        md5 = None
    if not (isinstance(md5, dict) and all(isinstance(md5.get(name), str) for name in SYNTHETIC_FILES)):
        raise RuntimeError(
            f"Dataset not found or corrupted: the marker '{marker}' does not hold the md5 of "
            f"{', '.join(SYNTHETIC_FILES)} as JSON"
        )
    return md5


_VERIFIED_FILES: set[tuple] = set()  # (path, md5, size, mtime) of dataset files whose md5 matched in this process


class CIFAR100(torchvision.datasets.CIFAR100):
    """torchvision's CIFAR-100 (download, md5 checks) whose items are ``(image, labels)``.

    ``labels`` is a LongTensor of shape (4,): the 3-, 10-, 20- and 100-class labels.
    A folder written by ``make_synthetic_cifar100`` is accepted too: its marker file holds
    the md5 of each file, and torchvision checks the files against those instead.
    """

    def __init__(self, root: str | Path, train: bool = True, transform=None, download: bool = False):
        marker = Path(root) / SYNTHETIC_MARKER
        if marker.is_file():
            md5 = _marker_checksums(marker)
            self.train_list = [["train", md5["train"]]]
            self.test_list = [["test", md5["test"]]]
            self.meta = {**self.meta, "md5": md5["meta"]}
            download = False  # never download the real archive over a synthetic folder
        super().__init__(root, train=train, transform=transform, download=download)
        # The files are md5-checked, so their coarse_labels are FINE_TO_COARSE of the fine labels: mapping
        # them saves reading the 150 MB train file a second time (torchvision keeps only the fine labels).
        fine = np.asarray(self.targets, dtype=np.int64)
        self.labels = torch.from_numpy(hierarchy_labels(fine, np.asarray(FINE_TO_COARSE, dtype=np.int64)[fine]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = super().__getitem__(index)
        return image, self.labels[index]

    def _check_integrity(self) -> bool:
        """torchvision's md5 check of the train and test files, once per process for a file that has not
        changed since: torchvision runs it up to three times to load the train and the test set (180 MB)."""
        for name, md5 in self.train_list + self.test_list:
            path = Path(self.root, self.base_folder, name)
            try:
                stat = path.stat()
            except OSError:
                return False
            key = (str(path.resolve()), md5, stat.st_size, stat.st_mtime_ns)
            if key not in _VERIFIED_FILES:
                if not check_integrity(str(path), md5):
                    return False
                _VERIFIED_FILES.add(key)
        return True

    def split(self, held_out: np.ndarray, held_out_transform=None) -> tuple[CIFAR100, CIFAR100]:
        """(the images not in `held_out`, the images in it), as two datasets; the second with its own transform."""
        mask = np.zeros(len(self.data), dtype=bool)
        mask[np.asarray(held_out, dtype=np.int64)] = True
        parts = []
        for keep, transform in ((~mask, self.transform), (mask, held_out_transform)):
            part = copy.copy(self)
            part.data, part.labels, part.transform = self.data[keep], self.labels[torch.from_numpy(keep)], transform
            part.targets = [t for t, k in zip(self.targets, keep) if k]
            parts.append(part)
        return parts[0], parts[1]


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

    def split(n: int) -> dict:
        fine = np.arange(n) % 100
        rng.shuffle(fine)
        images = prototypes[fine] + rng.normal(0, 25, size=(n, 3, 32, 32))
        data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        return {
            "filenames": [f"synthetic_{i:06d}.png" for i in range(n)],
            "batch_label": "synthetic",
            "fine_labels": fine.tolist(),
            "coarse_labels": [FINE_TO_COARSE[k] for k in fine],
            "data": data,
        }

    # Everything is made in memory before the first folder is: running out of memory leaves nothing on disk.
    contents = {
        "train": split(n_train),
        "test": split(n_test),
        "meta": {"fine_label_names": FINE_LABEL_NAMES, "coarse_label_names": COARSE_LABEL_NAMES},
    }
    made: list[Path] = []  # folders and files this call has made, in order
    try:
        _write_archive(Path(root), contents, made)
    except BaseException:
        _remove_made(made)
        raise
    return Path(root)


def _write_archive(root: Path, contents: dict[str, object], made: list[Path]) -> None:
    """Pickle each of `contents` into root/cifar-100-python/, then the marker with their md5 beside that folder;
    appends to `made` each folder it makes and each file it opens for writing."""
    folder = root / CIFAR100.base_folder
    _make_folders(folder, made)
    md5 = {}
    for name, obj in contents.items():
        with open(folder / name, "wb") as f:
            made.append(folder / name)  # opened for writing, its old content (if any) is gone: ours to remove
            pickle.dump(obj, f, protocol=2)
        md5[name] = _md5(folder / name)
    with open(root / SYNTHETIC_MARKER, "w") as f:
        made.append(root / SYNTHETIC_MARKER)
        f.write(json.dumps(md5, indent=1) + "\n")


def _make_folders(folder: Path, made: list[Path]) -> None:
    """mkdir -p `folder`, appending to `made` each folder made, outermost first (mkdir -p does not say which)."""
    missing = list(itertools.takewhile(lambda path: not path.exists(), (folder, *folder.parents)))
    for path in reversed(missing):
        path.mkdir()
        made.append(path)


def _remove_made(made: list[Path]) -> None:
    """Remove what a failed make_synthetic_cifar100 made, newest first (files before their folders). A folder
    is removed only when empty, so that what someone else put there meanwhile stays; a removal that fails
    is skipped, so that the caller sees the error that stopped the writing."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()


def crop_flip_indices(
    n: int, generator: torch.Generator, device: torch.device, size: int = 32, padding: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices into a zero-padded image for a random crop then a random flip.

    One crop offset in [0, 2 * padding] per axis and one fair coin per image, as
    RandomCrop(size, padding) followed by RandomHorizontalFlip draw them.
    Returns rows (n, size) and cols (n, size).
    """
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    ramp = torch.arange(size, device=device)
    rows = offsets[:, :1] + ramp
    cols = offsets[:, 1:] + torch.where(flip[:, None], size - 1 - ramp, ramp)
    return rows, cols


def augment_on_device(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip of uint8 (N, 3, H, W) images, per image.

    Zero padding happens on the uint8 image, before normalisation, as in torchvision.
    """
    n, _, size, _ = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows, cols = crop_flip_indices(n, generator, images.device, size, padding)
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
    (``augment=True``) or TEST_TRANSFORM (``augment=False``). Its randomness comes from
    its own ``generator`` (on ``device``), whose state a checkpoint saves.
    """

    def __init__(
        self, dataset: CIFAR100, batch_size: int, device: torch.device, shuffle: bool, augment: bool, seed: int
    ):
        self.images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = dataset.labels.to(device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        device = self.images.device
        order = (
            torch.randperm(n, generator=self.generator, device=device)
            if self.shuffle
            else torch.arange(n, device=device)
        )
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.images[index]
            if self.augment:
                images = augment_on_device(images, self.generator)
            yield normalize(images), self.labels[index]


def _folder(text: str) -> Path:
    """--synthetic's value. An empty path would mean the current folder, never what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no folder; give the folder to write into")
    return Path(text)


def _command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a synthetic CIFAR-100 in the real archive's format, to try the scripts without the "
        "download: python model_vgg_maxl.py --data-root DIR --no-download",
        allow_abbrev=False,
    )
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")  # one line, no usage dump
    parser.add_argument("--synthetic", type=_folder, required=True, metavar="DIR", help="folder to write it into")
    parser.add_argument("--train", type=int, default=50_000, help="training images, 1 to 50,000 (CIFAR-100 has 50,000)")
    parser.add_argument("--test", type=int, default=10_000, help="test images, 1 to 10,000 (CIFAR-100 has 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and labels")
    return parser


def _refusal(args: argparse.Namespace) -> str | None:
    """Why the parsed command line cannot be run, or None. Checked before anything is written."""
    for name, most in CIFAR100_SIZES.items():
        count = getattr(args, name)
        if count < 1:
            return f"--{name} must be at least 1 (got {count})"
        # All images are made in memory first (3.2 GB at CIFAR-100's own sizes): a size beyond those is refused
        # here rather than left to run out of memory; no script needs more images than CIFAR-100 has.
        if count > most:
            return f"--{name} must be at most {most}, the size of CIFAR-100's {name} set (got {count})"
    if not 0 <= args.seed < 2**32:
        return f"--seed must be between 0 and {2**32 - 1}"
    return None


def main(argv: list[str] | None = None) -> None:
    """python create_dataset.py --synthetic DIR [--train N] [--test M]: a synthetic dataset for trying the scripts.
    A refusal is one line on stderr and exit code 2, with nothing written."""
    parser = _command_line()
    args = parser.parse_args(argv)
    if refusal := _refusal(args):
        parser.exit(2, f"error: {refusal}\n")
    folder = args.synthetic / CIFAR100.base_folder
    try:
        if folder.exists():
            parser.exit(2, f"error: '{folder}' exists already; choose another folder\n")
        make_synthetic_cifar100(args.synthetic, n_train=args.train, n_test=args.test, seed=args.seed)
    except OSError as error:  # a folder not writable, a full disk, a name too long: make_synthetic_cifar100 cleaned up
        parser.exit(
            2,
            f"error: cannot write to '{args.synthetic}' ({error.strerror or error}); nothing was left behind; "
            "choose another folder\n",
        )
    except MemoryError:
        parser.exit(
            2,
            f"error: not enough memory to make {args.train} train and {args.test} test images; nothing was "
            "left behind; ask for fewer with --train and --test\n",
        )
    print(f"wrote {args.train} train and {args.test} test images to {folder}")


if __name__ == "__main__":
    main()
