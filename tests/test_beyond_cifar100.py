"""Every method end to end on every dataset and backbone it accepts, on tiny synthetic data in each dataset's real
on-disk layout (create_dataset.make_synthetic), through the real loaders; the data settings in run names and
metrics.json; --train-fraction; the refusals. One epoch of one batch per pass: each run takes seconds.

The runs build narrow instances of the torchvision classes behind resnet18, resnet50 and vit_b_16 (one block
per stage, a one-layer ViT): the scripts' code is the same, the full-size networks would take minutes here.
tests/test_backbones.py builds the full-size ones."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torchvision
from conftest import default_name, run_main
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

import create_dataset
import experiment
import model_vgg_human as human
import model_vgg_maoal as maoal
import model_vgg_maxl as maxl
import model_vgg_single as single
import model_vgg_wamal as wamal
from create_dataset import DATASETS, NUM_CLASSES, make_synthetic

TINY = ["--no-download", "--device", "cpu", "--workers", "0", "--batch-size", "4", "--epochs", "1"]
TINY += ["--limit-batches", "1"]
OTHER_DATASETS = [name for name in DATASETS if name != "cifar100"]
BACKBONES = experiment.BACKBONES
# Each method on every dataset, the backbones in rotation (a different one per method at each dataset), so that
# every method also meets every backbone; the cross product would take minutes.
PLAN = [
    (script, dataset, BACKBONES[(i + shift) % len(BACKBONES)])
    for shift, script in enumerate((single, maxl, wamal))
    for i, dataset in enumerate(DATASETS)
]


@pytest.fixture(autouse=True)
def narrow_backbones(monkeypatch):
    """torchvision.models' resnet18, resnet50 and vit_b_16 as narrow networks of the same classes."""
    monkeypatch.setattr(torchvision.models, "resnet18", lambda weights=None: ResNet(BasicBlock, [1, 1, 1, 1]))
    monkeypatch.setattr(
        torchvision.models, "resnet50", lambda weights=None: ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=8)
    )
    monkeypatch.setattr(
        torchvision.models,
        "vit_b_16",
        lambda image_size=224, weights=None: VisionTransformer(image_size, 16, 1, 2, 16, 32),
    )


@pytest.fixture(scope="session")
def datasets(tmp_path_factory, data_root) -> dict:
    """A data root per dataset: 40 train and 8 test images (cub200 and food101: each class once in train)."""
    roots = {"cifar100": data_root}
    for name in OTHER_DATASETS:
        n_train = max(40, NUM_CLASSES.get(name, 0))
        roots[name] = make_synthetic(name, tmp_path_factory.mktemp(name) / "data", n_train=n_train, n_test=8)
    return roots


def run_dir(tmp_path, name: str):
    return tmp_path / "results" / name


@pytest.mark.parametrize(
    "script, dataset, backbone",
    PLAN,
    ids=[f"{script.__name__[10:]}-{dataset}-{backbone}" for script, dataset, backbone in PLAN],
)
def test_every_method_trains_on_every_dataset_and_backbone(script, dataset, backbone, datasets, tmp_path):
    # Large images at 32 keep the runs small; their real pipeline (file decoding, RandomResizedCrop) still runs.
    size = [] if dataset in ("cifar100", "cifar10", "svhn") else ["--image-size", "32"]
    given = ["--dataset", dataset, "--backbone", backbone, *size, "--data-root", datasets[dataset]]
    result = run_main(script, *TINY, *given, "--results-dir", tmp_path / "results")
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "results").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    config = metrics["config"]
    assert (config["dataset"], config["backbone"]) == (dataset, backbone)
    assert config["stem"] == ("cifar" if backbone in ("resnet18", "resnet50") else None)
    assert config["image_size"] == 32
    classes = {"cifar100": 20, "folder": len(list((datasets["folder"] / "train").iterdir()))}.get(dataset)
    assert config["primary_level"] == (classes or NUM_CLASSES[dataset])
    tag = "-".join(part for part in (dataset, backbone) if part not in ("cifar100", "vgg16"))
    assert (f"seed0-{tag}-" if tag else "seed0-") in folder.name
    assert np.isfinite(metrics["epochs"][0]["test_primary_loss"])
    if script is not single:
        assert config["aux_classes"] == 5 * config["primary_level"]  # psi: 5 per class, or the hierarchy's 20 -> 100


@pytest.mark.parametrize("backbone", BACKBONES[1:])
def test_human_trains_on_every_backbone(backbone, data_root, tmp_path):
    result = run_main(human, *TINY, "--backbone", backbone, "--data-root", data_root, "--results-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith(f"human-pri20-aux100-seed0-{backbone}-")
    assert json.loads((folder / "metrics.json").read_text())["config"]["backbone"] == backbone


@pytest.mark.parametrize(
    "script, flags, message",
    [
        (human, ["--dataset", "cifar10"], "human runs on cifar100 only (its auxiliary task is the finer level"),
        (maoal, ["--dataset", "folder"], "maoal runs on cifar100 only"),
        (maoal, ["--backbone", "vit_b_16"], "maoal is defined on vgg16, resnet18 only"),
        (maoal, ["--backbone", "resnet18"], "the hierarchy task's lambda weighs VGG-16's five blocks"),
        (single, ["--dataset", "cifar10", "--primary-level", "3"], "--primary-level 3 picks a level of CIFAR-100"),
        (maxl, ["--dataset", "svhn", "--aux-level", "100"], "--aux-level 100 picks a level of CIFAR-100"),
        (maxl, ["--dataset", "cifar10", "--psi", "2,3"], "--psi has 2 entries but the primary task has 10 classes"),
        (single, ["--dataset", "oxford-pet", "--data-path", "device"], "--data-path device holds 32x32 datasets"),
        (single, ["--train-fraction", "0"], "--train-fraction must be in (0, 1]"),
    ],
)
def test_refusals_are_one_line(script, flags, message, datasets, tmp_path):
    result = run_main(script, *TINY, *flags, "--data-root", datasets["cifar10"], "--results-dir", tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_a_missing_dataset_says_how_to_get_it(tmp_path):
    result = run_main(single, *TINY, "--dataset", "food101", "--data-root", tmp_path / "none")
    assert result.returncode == 2 and "Food-101 not found or corrupted in" in result.stderr
    assert "run without --no-download to fetch it (5.0 GB)" in result.stderr
    result = run_main(single, *TINY, "--dataset", "folder", "--data-root", tmp_path / "none")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and "train" in result.stderr


def test_a_folder_of_ones_own_images_counts_its_classes(datasets):
    # The dataset set in Config: primary_level and psi follow it, as after --dataset.
    cfg = maxl.check_config(maxl.Config(dataset="folder", data_root=str(datasets["folder"])))
    classes = len(list((datasets["folder"] / "train").iterdir()))
    assert cfg.primary_level == classes and cfg.psi == [5] * classes and cfg.aux_level is None
    assert cfg.image_size == 224 and cfg.stem is None
    assert default_name(maxl, cfg) == f"maxl-second-order-pri{classes}-aux{5 * classes}-seed0-folder"


def test_train_fraction_is_stratified_and_the_same_for_a_seed(datasets):
    classes = np.repeat(np.arange(10), [10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    kept = create_dataset.stratified_fraction(classes, 0.1, seed=3)
    assert np.array_equal(np.bincount(classes[kept]), np.arange(1, 11))
    assert np.array_equal(kept, create_dataset.stratified_fraction(classes, 0.1, seed=3))
    assert not np.array_equal(kept, create_dataset.stratified_fraction(classes, 0.1, seed=4))
    assert len(create_dataset.stratified_fraction(classes, 0.001, seed=0)) == 10  # at least one image a class
    cfg = single.check_config(single.Config(dataset="cifar10", train_fraction=0.5, device="cpu"))
    cfg = dataclasses.replace(cfg, data_root=str(datasets["cifar10"]), workers=0, batch_size=4)
    loaders = create_dataset.make_loaders(cfg, torch.device("cpu"), *create_dataset.load_datasets(cfg))
    assert len(loaders.train.dataset) == 20 and len(loaders.test.dataset) == 8
    assert default_name(single, cfg).startswith("single-pri10-seed0-cifar10-frac0.5-")


def test_the_papers_run_keeps_its_name_and_data_settings():
    for script in (single, human, maxl, wamal, maoal):
        cfg = script.check_config(script.Config())
        assert experiment.paper_data(cfg) and experiment.data_tag(cfg) == ""
        assert (cfg.dataset, cfg.backbone, cfg.image_size, cfg.stem, cfg.train_fraction) == (
            "cifar100",
            "vgg16",
            32,
            None,
            1.0,
        )
