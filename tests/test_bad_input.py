"""A researcher's own messy image folder, checked before training; the values every flag is refused outside of; the
settings of one task or mode refused in another; --pretrained without the weights and without internet. Each refusal
is one line on stderr, exit code 2, with nothing written and no folder left behind."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from conftest import FAST, run_main

import create_dataset
import model_vgg_human as human
import model_vgg_maoal as maoal
import model_vgg_maxl as maxl
import model_vgg_single as single
import model_vgg_wamal as wamal


def refused(result, *phrases: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder of one's own images: 3 classes (apple, banana, cherry) of PNGs, 18 for training and 9 for testing."""
    return create_dataset.make_synthetic("folder", tmp_path / "images", n_train=18, n_test=9, seed=0)


def run_on(folder: Path, results: Path, *extra: str):
    return run_main(single, "--dataset", "folder", "--data-root", folder, "--results-dir", results, *FAST, *extra)


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height pixels, with (almost) no image data: what a reader sees first."""
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_unreadable_images_are_refused_before_training_naming_how_many_and_which(folder, tmp_path):
    train = folder / "train"
    whole = next((train / "apple").glob("*.png")).read_bytes()
    (train / "apple" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (train / "banana" / "random.jpg").write_bytes(os.urandom(3000))
    (train / "banana" / "zero.png").write_bytes(b"")
    (train / "cherry" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    line = refused(run_on(folder, tmp_path / "r"), f"4 of the 22 images in '{train}' cannot be used:")
    assert (
        "apple/truncated.png (truncated), banana/random.jpg (not an image), banana/zero.png (empty) and 1 more" in line
    )
    assert line.endswith("delete them or move them out of the folder")
    assert create_dataset._image_problem(train / "cherry" / "gone.png") == "a broken link"
    assert not (tmp_path / "r").exists()


def test_an_image_larger_than_pil_decodes_is_refused(folder, tmp_path):
    (folder / "train" / "apple" / "huge.png").write_bytes(png_header(20_000, 20_000))
    refused(run_on(folder, tmp_path / "r"), "apple/huge.png (larger than 89,478,485 pixels)")
    assert not (tmp_path / "r").exists()


def test_hidden_folders_are_not_classes_links_are_followed_once_and_other_files_ignored(folder, tmp_path):
    train = folder / "train"
    image = next((train / "apple").glob("*.png"))
    for hidden in (train / ".cache" / "x", train / ".ipynb_checkpoints", train / "apple" / ".thumbs"):
        hidden.mkdir(parents=True)
        (hidden / "copy.png").write_bytes(image.read_bytes())
    (train / "apple" / "loop").symlink_to(".")  # a link back up: read once, never in circles
    (train / "banana" / "notes.txt").write_text("not an image")
    (train / "banana" / ".hidden.png").write_bytes(b"junk")
    (folder / "test" / ".cache").mkdir()
    data = create_dataset.FolderDataset(folder, train=True)
    assert data.classes == ["apple", "banana", "cherry"] and len(data) == 18
    assert create_dataset.dataset_classes("folder", folder) == 3
    result = run_on(folder, tmp_path / "r", "--epochs", "1", "--image-size", "32", "--batch-size", "6")
    assert result.returncode == 0, result.stderr


def test_fewer_than_two_classes_are_refused(tmp_path):
    folder = create_dataset.make_synthetic("folder", tmp_path / "images", n_train=6, n_test=3, seed=0)
    for split in ("train", "test"):
        for name in ("banana", "cherry"):
            for path in (folder / split / name).iterdir():
                path.unlink()
            (folder / split / name).rmdir()
    refused(run_on(folder, tmp_path / "r"), "holds one class folder (apple); a classifier needs two or more")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "0"], "--image-size must be at least 32 (got 0)"),
        (["--image-size", "100000"], "--image-size must be at most 1024 (got 100000)"),
        (["--workers", "100000"], "the CPUs this process may use (got 100000)"),
    ],
)
def test_values_outside_their_range_are_refused(data_root, tmp_path, flags, message):
    cmd = ["--data-root", data_root, "--results-dir", tmp_path / "r", "--no-download", "--device", "cpu", *flags]
    refused(run_main(single, *cmd), message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "module, flags, message",
    [
        (maoal, ["--aux-domains", "0-3"], "--aux-domains 0-3 is used with --task domains only"),
        (maoal, ["--target-domain", "3"], "--target-domain 3 is used with --task domains only"),
        (maoal, ["--task", "domains", "--dev-size", "10"], "--dev-size 10 is used with --task hierarchy only"),
        (maoal, ["--mode", "equal", "--neumann-alpha", "0.1"], "--neumann-alpha 0.1 is used with --mode maoal only"),
        (maoal, ["--mode", "gcs", "--combiner-lr", "0.1"], "--combiner-lr 0.1 is used with --mode aux only"),
        (maoal, ["--momentum", "1.5"], "--momentum must be 0 or more and below 1 (got 1.5)"),
        (maxl, ["--fd-step", "0.001"], "--fd-step 0.001 is used with --meta-grad finite-difference only"),
        (maxl, ["--entropy-weight", "-1"], "--entropy-weight must be 0 or more (got -1.0)"),
        (maxl, ["--aux-weight", "-1"], "--aux-weight must be 0 or more (got -1.0)"),
        (wamal, ["--aux-weight", "-0.5"], "--aux-weight must be 0 or more (got -0.5)"),
        (human, ["--aux-weight", "-2"], "--aux-weight must be 0 or more (got -2.0)"),
    ],
)
def test_a_setting_of_another_task_or_mode_or_out_of_range_is_refused(data_root, tmp_path, module, flags, message):
    cmd = ["--data-root", data_root, "--results-dir", tmp_path / "r", "--no-download", "--device", "cpu", *flags]
    line = refused(run_main(module, *cmd), message)
    assert "is used with" not in line or line.endswith(f"drop {flags[-2]}")
    assert not (tmp_path / "r").exists()


def test_pretrained_weights_without_internet_name_the_file_and_where_it_goes(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cmd = ["--data-root", data_root, "--results-dir", tmp_path / "r", *FAST, "--backbone", "resnet18", "--pretrained"]
    line = refused(run_main(single, *cmd), f"are not in '{tmp_path / 'torch' / 'hub' / 'checkpoints'}'")
    assert "put resnet18-f37072fd.pth there by hand" in line and "TORCH_HOME" in line
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in line
    assert not (tmp_path / "r").exists()
