"""The GPU-resident data path (crop_flip_indices, augment_on_device, normalize, DeviceLoader), on the CPU.

It must do what TRAIN_TRANSFORM / TEST_TRANSFORM do image by image with torchvision: zero padding on the
uint8 image, a 32x32 crop at a uniform offset in 0..8 per axis, a fair horizontal flip, then
ToTensor + Normalize(0.5, 0.2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from create_dataset import (
    CIFAR100,
    TEST_TRANSFORM,
    DeviceLoader,
    augment_on_device,
    crop_flip_indices,
    normalize,
)

CPU = torch.device("cpu")
PAD_VALUE = (0 - 0.5) / 0.2  # normalised zero padding: -2.5
WHITE_VALUE = (1 - 0.5) / 0.2  # normalised 255: 2.5


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device=CPU)
    g.manual_seed(seed)
    return g


def _random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=_gen(seed), dtype=torch.uint8)


def _draws(rows: torch.Tensor, cols: torch.Tensor) -> tuple[list[int], list[int], list[bool]]:
    """Top offset, left offset and flip implied by crop_flip_indices' output."""
    tops = rows[:, 0].tolist()
    lefts = cols.min(dim=1).values.tolist()
    flips = (cols[:, 1] < cols[:, 0]).tolist()
    return tops, lefts, flips


def _to_uint8(batch: torch.Tensor) -> torch.Tensor:
    """Invert normalize(): float (N, 3, H, W) -> uint8, exact for values that came from uint8."""
    return torch.round((batch * 0.2 + 0.5) * 255).clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def train_set(data_root):
    return CIFAR100(data_root, train=True)


@pytest.fixture(scope="module")
def train_uint8(train_set):
    return torch.from_numpy(train_set.data).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- crop_flip_indices


def test_crop_flip_indices_shapes_and_bounds():
    n = 500
    rows, cols = crop_flip_indices(n, _gen(0), CPU)
    assert rows.shape == (n, 32) and cols.shape == (n, 32)
    assert not rows.is_floating_point() and not cols.is_floating_point()
    for idx in (rows, cols):
        assert int(idx.min()) >= 0 and int(idx.max()) <= 39
    ramp = torch.arange(32)
    # Rows: 32 consecutive increasing integers starting at the top offset in 0..8.
    assert torch.equal(rows, rows[:, :1] + ramp)
    assert int(rows[:, 0].min()) >= 0 and int(rows[:, 0].max()) <= 8
    # Cols: 32 consecutive integers, increasing (no flip) or decreasing (flip), inside [left, left + 31].
    left = cols.min(dim=1, keepdim=True).values
    flipped = cols[:, 1] < cols[:, 0]
    assert torch.equal(cols[~flipped], left[~flipped] + ramp)
    assert torch.equal(cols[flipped], left[flipped] + 31 - ramp)
    assert int(left.min()) >= 0 and int(left.max()) <= 8
    assert 0 < int(flipped.sum()) < n


def test_crop_flip_indices_other_sizes():
    rows, cols = crop_flip_indices(300, _gen(1), CPU, size=8, padding=2)
    assert rows.shape == (300, 8) and cols.shape == (300, 8)
    assert int(rows.min()) >= 0 and int(rows.max()) <= 11
    assert int(cols.min()) >= 0 and int(cols.max()) <= 11
    assert set(rows[:, 0].tolist()) == set(range(5))
    assert set(cols.min(dim=1).values.tolist()) == set(range(5))


def test_crop_flip_indices_deterministic_per_seed():
    a = crop_flip_indices(64, _gen(3), CPU)
    b = crop_flip_indices(64, _gen(3), CPU)
    c = crop_flip_indices(64, _gen(4), CPU)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_offsets_uniform_and_flip_fair():
    n = 20000
    rows, cols = crop_flip_indices(n, _gen(123), CPU)
    tops, lefts, flips = _draws(rows, cols)
    for offsets in (tops, lefts):
        freq = np.bincount(offsets, minlength=9) / n
        assert len(freq) == 9
        assert np.all(np.abs(freq - 1 / 9) < 0.01), freq
    flip_rate = float(np.mean(flips))
    assert abs(flip_rate - 0.5) < 0.02, flip_rate
    # Top and left offsets are drawn independently, not one shared offset.
    assert np.mean(np.asarray(tops) == np.asarray(lefts)) < 0.2


# --------------------------------------------------------------------------- augment_on_device / normalize


def test_augment_shapes_and_dtype():
    images = _random_images(17)
    out = augment_on_device(images, _gen(0))
    assert out.dtype == torch.uint8
    assert out.shape == (17, 3, 32, 32)
    assert images.shape == (17, 3, 32, 32)  # input untouched in shape
    assert torch.equal(images, _random_images(17))  # and in content


def test_normalize_shape_dtype_and_values():
    images = torch.tensor([0, 51, 102, 255], dtype=torch.uint8).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    expected = torch.tensor([-2.5, -1.5, -0.5, 2.5]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_padding_is_zero_before_normalisation():
    n = 64
    images = torch.full((n, 3, 32, 32), 255, dtype=torch.uint8)
    out = normalize(augment_on_device(images, _gen(5)))
    rows, cols = crop_flip_indices(n, _gen(5), CPU)
    tops, lefts, _ = _draws(rows, cols)

    is_pad = torch.isclose(out, torch.tensor(PAD_VALUE), atol=1e-6, rtol=0)
    is_white = torch.isclose(out, torch.tensor(WHITE_VALUE), atol=1e-6, rtol=0)
    assert bool((is_pad | is_white).all())
    assert bool(is_pad.any()) and bool(is_white.any())

    # The padded border, predicted from the indices: index < 4 or > 35 in the 40x40 padded image.
    row_pad = (rows < 4) | (rows > 35)
    col_pad = (cols < 4) | (cols > 35)
    expected = (row_pad[:, :, None] | col_pad[:, None, :])[:, None].expand(n, 3, 32, 32)
    assert torch.equal(is_pad, expected)

    # Per image: |top - 4| fully padded rows and |left - 4| fully padded columns.
    full_rows = is_pad.all(dim=3).all(dim=1).sum(dim=1).tolist()
    full_cols = is_pad.all(dim=2).all(dim=1).sum(dim=1).tolist()
    assert full_rows == [abs(t - 4) for t in tops]
    assert full_cols == [abs(left - 4) for left in lefts]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augment_equals_torchvision_pad_crop_flip(seed):
    n = 16
    images = _random_images(n, seed=100 + seed)
    out = augment_on_device(images, _gen(seed))
    rows, cols = crop_flip_indices(n, _gen(seed), CPU)
    tops, lefts, flips = _draws(rows, cols)
    for i in range(n):
        expected = TF.crop(TF.pad(images[i], 4, fill=0), tops[i], lefts[i], 32, 32)
        if flips[i]:
            expected = TF.hflip(expected)
        assert torch.equal(out[i], expected), i
    assert 0 < sum(flips) < n  # both branches exercised


def test_augment_and_normalize_equal_the_pil_path(train_set, train_uint8):
    """One dataset image: device path vs torchvision's PIL path (pad, crop, flip, ToTensor, Normalize)."""
    for seed in range(6):
        index = 7 + seed
        out = normalize(augment_on_device(train_uint8[index : index + 1], _gen(seed)))[0]
        rows, cols = crop_flip_indices(1, _gen(seed), CPU)
        (top,), (left,), (flip,) = _draws(rows, cols)
        pil = Image.fromarray(train_set.data[index])
        pil = TF.crop(TF.pad(pil, 4, fill=0), top, left, 32, 32)
        if flip:
            pil = TF.hflip(pil)
        expected = TEST_TRANSFORM(pil)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_normalize_equals_test_transform(train_set, train_uint8):
    out = normalize(train_uint8[:10])
    expected = torch.stack([TEST_TRANSFORM(Image.fromarray(train_set.data[i])) for i in range(10)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- DeviceLoader


def _loader(dataset, batch_size=64, shuffle=True, augment=True, seed=0):
    return DeviceLoader(dataset, batch_size, CPU, shuffle=shuffle, augment=augment, seed=seed)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _assert_same_epochs(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("batch_size", [7, 50, 64, 100, 199, 200, 256])
def test_loader_length_and_batch_shapes(train_set, batch_size):
    loader = _loader(train_set, batch_size=batch_size)
    assert len(loader) == math.ceil(200 / batch_size)
    batches = list(loader)
    assert len(batches) == len(loader)
    sizes = [len(x) for x, _ in batches]
    assert sum(sizes) == 200
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (len(x), 4)


def test_loader_plain_ordered_equals_test_transform(train_set):
    loader = _loader(train_set, batch_size=64, shuffle=False, augment=False)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    expected = torch.stack([TEST_TRANSFORM(Image.fromarray(train_set.data[i])) for i in range(len(train_set))])
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
    assert torch.equal(labels, train_set.labels)
    for i in (0, 63, 64, 199):
        assert torch.equal(train_set[i][1], labels[i])


def test_loader_shuffled_epoch_covers_every_image_once(train_set, train_uint8):
    index_of = {train_uint8[i].numpy().tobytes(): i for i in range(len(train_uint8))}
    assert len(index_of) == 200  # images are distinct, so they identify themselves
    loader = _loader(train_set, batch_size=64, shuffle=True, augment=False, seed=3)
    seen = []
    for x, y in loader:
        for image, label in zip(_to_uint8(x), y):
            i = index_of[image.numpy().tobytes()]
            assert torch.equal(label, train_set.labels[i])
            seen.append(i)
    assert sorted(seen) == list(range(200))
    assert seen != list(range(200))  # actually shuffled
    # The next epoch is a different permutation.
    second = [index_of[img.numpy().tobytes()] for x, _ in loader for img in _to_uint8(x)]
    assert sorted(second) == list(range(200)) and second != seen


def _all_crop_flips(images: torch.Tensor) -> dict[bytes, int]:
    """Every one of the 9 x 9 x 2 crops/flips of each image -> the image's index."""
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    table = {}
    for top in range(9):
        for left in range(9):
            crops = padded[:, :, top : top + 32, left : left + 32]
            for variant in (crops, crops.flip(3)):
                for i, v in enumerate(variant):
                    table[v.contiguous().numpy().tobytes()] = i
    return table


@pytest.fixture(scope="module")
def crop_flip_table(train_uint8):
    return _all_crop_flips(train_uint8)


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_augmented_batches_are_crops_and_flips_of_their_images(train_set, train_uint8, crop_flip_table, shuffle):
    table = crop_flip_table
    loader = _loader(train_set, batch_size=64, shuffle=shuffle, augment=True, seed=11)
    seen, flipped_or_moved = [], 0
    for x, y in loader:
        assert x.dtype == torch.float32
        for image, label in zip(_to_uint8(x), y):
            i = table[image.numpy().tobytes()]  # KeyError: not a crop/flip of any image
            assert torch.equal(label, train_set.labels[i])
            seen.append(i)
            flipped_or_moved += not torch.equal(image, train_uint8[i])
    assert sorted(seen) == list(range(200))
    if not shuffle:
        assert seen == list(range(200))
    assert flipped_or_moved > 150  # 1 - 1/162 of images change


def test_loader_same_seed_same_batches(train_set):
    a = _epoch(_loader(train_set, seed=5))
    b = _epoch(_loader(train_set, seed=5))
    c = _epoch(_loader(train_set, seed=6))
    _assert_same_epochs(a, b)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))


def test_loader_generator_state_reproduces_next_epoch(train_set):
    loader = _loader(train_set, seed=9)
    first = _epoch(loader)
    state = loader.generator.get_state()
    second = _epoch(loader)
    assert not torch.equal(first[0][0], second[0][0])  # the generator moves on between epochs

    loader.generator.set_state(state)
    _assert_same_epochs(second, _epoch(loader))

    # As when resuming from a checkpoint: a fresh loader with another seed, given the saved state.
    resumed = _loader(train_set, seed=12345)
    resumed.generator.set_state(state)
    _assert_same_epochs(second, _epoch(resumed))


def test_loader_labels_match_dataset_labels(train_set):
    loader = _loader(train_set, batch_size=32, shuffle=False, augment=True)
    assert torch.equal(loader.labels, train_set.labels)
    assert torch.equal(torch.cat([y for _, y in loader]), train_set.labels)
    assert loader.images.dtype == torch.uint8 and loader.images.shape == (200, 3, 32, 32)
