"""The run machinery every model script shares: command line, data, devices, CUDA graphs, checkpoints, resume.

A model script holds its method (networks, losses, steps, one epoch) and hands it over as one `Method`:

    METHOD = Method(name="maxl", config=Config, description=__doc__, build=build, train_epoch=train_epoch, ...)

    def main(argv=None):
        experiment.main(METHOD, argv)

`main` parses the flags of `Config` (a subclass of `RunConfig`: the experiment's fields, then these shared
ones), refuses bad input in one line, and `run` trains: it takes the run folder and its lock, loads
--dataset, calls `build` once and `train_epoch` and `evaluate` every epoch, and after each epoch writes the
checkpoint and metrics.json atomically and the epoch's line to log.txt (with the run's provenance); `--resume`
continues exactly where a run stopped. Step functions take what they need from here by name (`batches`, which
also draws the progress line on a terminal, `Meter`, `FiniteGuard`, `StepGraphs`, `autocast`).
This module imports no model script. Behaviour and every refusal: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import interpolate_embeddings

from create_dataset import (
    DATASETS,
    SMALL_IMAGE_DATASETS,
    DatasetProblem,
    DeviceLoader,
    dataset_classes,
    dataset_folder,
    dataset_transforms,
    is_synthetic,
    level_index,
    make_synthetic,
    open_dataset,
)

PAPER_EPOCHS = 200  # the paper reports the mean test accuracy of the last 5 of 200 epochs
MAX_SEED = 2**32 - 1  # numpy's limit, the narrowest of the seeded generators
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a plain folder name, created inside --results-dir
MAX_RUN_NAME = 200  # characters: a file system's 255-byte names, less the temporary files' prefix and suffix
# Folders figure3.py and tables.py keep their reports and job logs in, inside --results-dir.
RESERVED_RUN_NAMES = {
    "figure3": "figure3.py keeps its report, picture and job logs",
    "tables": "tables.py keeps its reports and job logs",
}
LOCK_FILE = ".lock"
LOG_FILE = "log.txt"
# What a run writes into its folder; a folder holding anything else was not made by a run of this project.
RUN_FILES = re.compile(r"metrics\.json|checkpoint\.pt|log\.txt|\.lock|\..*\.tmp|events\.out\.tfevents\..*")
# Settings a resumed run may change; every other one must match the checkpoint.
RESUMABLE_CHANGES = {"epochs", "resume", "overwrite", "data_root", "download", "workers", "cuda_graphs"}
RESUMABLE_CHANGES |= {"results_dir", "tensorboard"}
SMOKE_SETTINGS = dict(download=False, device="cpu", epochs=1, batch_size=20, limit_batches=2, workers=0)
SMOKE_SETTINGS |= dict(run_name="smoke", resume=False, overwrite=False, smoke=False)
# Two steps move a sound network's test loss little at the paper's learning rate (2.704 -> 2.707 .. 2.715 for
# Single over three seeds), up to about 10x at 0.1 with momentum (BatchNorm's running statistics lag the weights:
# 1.94 -> 8.29 for MAOAL's CIFAR-100/20 ResNet-18, 6.37 -> 58.8 for Single's at --lr 0.1); a diverging one's
# by many orders of magnitude (--lr 0.5: 2.70 -> 4e18).
SMOKE_TOLERANCE = 100
SMOKE_SETS = {*SMOKE_SETTINGS, "data_root", "results_dir"} - {"smoke"}  # flags --smoke refuses: it sets them
# The settings that choose the data and the network, every script's: grouped in --help, named in run names.
DATA_SETTINGS = ("dataset", "data_root", "download", "train_fraction", "image_size", "backbone", "stem", "pretrained")
BACKBONES = ("vgg16", "resnet18", "resnet50", "vit_b_16")  # vgg16: the paper's; the others torchvision's
RESNETS = ("resnet18", "resnet50")
DATASET_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "svhn": "SVHN", "oxford-pet": "Oxford-IIIT Pet"}
DATASET_NAMES |= {"food101": "Food-101", "cub200": "CUB-200-2011", "folder": "the image folder"}
DOWNLOAD_SIZES = {"cifar100": "161 MB", "cifar10": "163 MB", "svhn": "246 MB", "oxford-pet": "790 MB"}
DOWNLOAD_SIZES |= {"food101": "5.0 GB", "cub200": "1.1 GB"}


# ---------------------------------------------------------------------------------------------
# Settings and the contract with a model script


def option(default, help: str, reset_by: tuple[str, ...] = (), **argparse_kwargs):
    """A Config field that becomes a command-line flag with this help text (a list default is copied per Config).

    `reset_by`: flags that, given on the command line without this one, set it to None (the method derives
    it: MAXL's psi follows --primary-level and --aux-level)."""
    metadata = {"help": help, "reset_by": reset_by, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """The data and run settings of every model script. A script's Config subclasses it with the experiment's
    fields, `epochs` and `batch_size` among them."""

    dataset: str = option(
        "cifar100",
        "cifar100 (the paper's, with its 4-level hierarchy), cifar10, svhn, oxford-pet, food101, cub200, or "
        "folder: your own images, --data-root/train/<class>/ and --data-root/test/<class>/",
        choices=DATASETS,
    )
    data_root: str = option(
        "dataset", "folder that holds (or receives) the dataset, e.g. cifar-100-python/; for folder: train/ and test/"
    )
    download: bool = option(True, "download the dataset when it is missing (torchvision's download and md5 check)")
    train_fraction: float = option(
        1.0, "train on this stratified fraction of the training set (per class; the same images for a seed)"
    )
    image_size: int | None = option(
        None, "input size; default: 32 for the 32x32 datasets (cifar100, cifar10, svhn), 224 for the others", type=int
    )
    backbone: str | None = option(
        None,
        "the trunk of every network: vgg16 (the paper's, written out in the script), or torchvision's resnet18, "
        "resnet50, vit_b_16 without their classifier; default: the paper's, vgg16 (MAOAL's --task domains: its "
        "authors' resnet18)",
        choices=BACKBONES,
    )
    stem: str | None = option(
        None,
        "the ResNets' first layers: cifar (3x3 stride-1 convolution, no max-pool) or imagenet (torchvision's); "
        "default: cifar at image size 32, imagenet otherwise",
        choices=("cifar", "imagenet"),
    )
    pretrained: bool = option(
        False, "start the backbone from torchvision's ImageNet weights (downloaded on first use; not vgg16)"
    )
    data_path: str = option(
        "auto",
        "device: whole dataset on the device, augmented there; loader: torchvision DataLoader; "
        "auto: device on CUDA, loader on CPU",
        choices=("auto", "device", "loader"),
    )
    workers: int | None = option(
        None,
        "DataLoader worker processes (loader data path); default: the CPUs this process may use, at most 4",
        type=int,
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    seed: int = option(0, "seeds python, numpy and torch")
    deterministic: bool = option(False, "deterministic algorithms and cuDNN settings (slower on CUDA)")
    amp: bool = option(False, "bf16 autocast on CUDA (changes the numerics; off reproduces the paper in fp32)")
    compile: bool = option(False, "torch.compile the networks' plain forward passes (phase 1, evaluation)")
    channels_last: bool = option(True, "channels_last memory format (faster convolutions on CUDA and on CPU)")
    cuda_graphs: bool = option(True, "replay each step as a CUDA graph on CUDA (same arithmetic, less launch overhead)")
    results_dir: str = option("results", "runs are written to <results-dir>/<run-name>/")
    run_name: str = option(
        "",
        "a plain folder name inside --results-dir; default: method, levels, seed, and a hash of the settings "
        "that differ from the paper's (e.g. {example})",
    )
    resume: bool = option(False, "continue the run in <results-dir>/<run-name> from its checkpoint")
    overwrite: bool = option(False, "start over in a run folder that already holds results")
    limit_batches: int = option(0, "only this many batches per pass (0 = all): smoke tests and benchmarks")
    tensorboard: bool = option(False, "also write each epoch's numbers as TensorBoard scalars into the run folder")
    smoke: bool = option(False, "one-minute install check on CPU: synthetic data in a temporary folder, no download")

    def __post_init__(self):
        if self.backbone is None:
            self.backbone = self.paper_backbone

    @property
    def paper_backbone(self) -> str:
        """The network of the paper this configuration reproduces (VGG-16); run names write another one."""
        return "vgg16"


@dataclass(frozen=True)
class Method:
    """What a model script hands the machinery: its name, settings and the functions of its method."""

    name: str  # run names, checkpoints, metrics.json
    config: type  # the script's Config (a RunConfig)
    description: str  # the script's docstring: its first paragraph heads --help
    check_config: Callable  # (cfg) -> cfg: refuses impossible settings (UsageError), parses psi and the like
    run_name_stem: Callable  # (cfg) -> the readable part of the default run name: method, levels, seed
    paper_settings: Callable  # (cfg) -> the paper's values of the other settings that change the result
    build: Callable  # (cfg, device) -> state: networks, optimisers, schedulers; "model" is the evaluated
    # network, keys without "forward_" are checkpointed, every LRScheduler steps once per epoch
    train_epoch: Callable  # (state, graphs, loaders, cfg, device, epoch) -> the epoch's training metrics
    eval_step: Callable  # (state, images, labels, cfg) -> one test batch's metrics (tensors)
    epoch_line: Callable  # (record, epochs) -> the line printed after each epoch
    derived_settings: Callable  # (cfg) -> values computed from the settings, stored beside them in metrics.json
    published_accuracy: Callable  # (cfg) -> {source: published test accuracy in %} for this configuration
    unpublished_because: Callable  # (cfg) -> why no figure is published for it (read where there is none)
    held_out: Callable | None = None  # (train_set, cfg) -> indices of a developing set kept out of training
    # (train_set, test_set, cfg) -> (train_set, test_set, [auxiliary train sets]): the method's own tasks cut from
    # the data before held_out (MAOAL's CIFAR-100 domains), or None: the data as loaded
    split_data: Callable | None = None
    cifar100_only: str = ""  # why the method runs on CIFAR-100 only (it needs the hierarchy's finer labels), or ""
    backbones: tuple[str, ...] = BACKBONES  # the backbones the method is defined on
    backbones_because: str = ""  # why only those (shown when another is asked for)


class UsageError(Exception):
    """Bad input or a refused action: shown as one line, exit code 2."""


class NonFiniteLoss(Exception):
    """A loss became NaN or infinite: the run stops, the last good checkpoint stays; `hint` says what to change."""

    def __init__(self, message: str, hint: str = "Try a smaller --lr, or --no-amp"):
        super().__init__(message)
        self.hint = hint


# ---------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (not the whole usage) and exit code 2."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def flag(name: str, value=None) -> str:
    """A setting as its command-line flag; a list (psi) as the command line writes it: 5 or 2,3,4."""
    if isinstance(value, list):
        value = value[0] if len(set(value)) == 1 else ",".join(str(v) for v in value)
    return f"--{name.replace('_', '-')}" + ("" if value is None else f" {value}")


def ordered_fields(config: type) -> list[dataclasses.Field]:
    """The experiment's fields first, as the script lists them, then the shared run settings."""
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    fields = dataclasses.fields(config)
    return [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]


def command_line(method: Method) -> OneLineParser:
    """One flag per Config field; a flag not given keeps the field's value in the script."""
    parser = OneLineParser(
        description=method.description.split("\n\n")[0],
        allow_abbrev=False,  # a typo of one flag must not silently mean another
        argument_default=argparse.SUPPRESS,
    )
    defaults = method.config()
    example = default_run_name(method, check_method(method, defaults))
    groups = {name: parser.add_argument_group(name) for name in ("the experiment", "data and network", "run")}
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    for f in ordered_fields(method.config):
        value = getattr(defaults, f.name)
        kwargs = {k: v for k, v in f.metadata.items() if k != "reset_by"}
        kwargs["help"] = kwargs["help"].format(example=example)
        if "default" not in kwargs["help"] and value not in (None, ""):
            kwargs["help"] += f" (default: {value})"
        group = groups[
            "data and network" if f.name in DATA_SETTINGS else "run" if f.name in shared else "the experiment"
        ]
        if f.type == "bool":
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(flag(f.name), **{"type": {"int": int, "float": float, "str": str}.get(f.type), **kwargs})
    return parser


def make_config(method: Method, **given):
    """The Config the command line makes of these flags: the script's values for the others, except that a
    field reset_by a given flag, and not given itself, is None (MAXL's psi then follows the hierarchy)."""
    for f in dataclasses.fields(method.config):
        if f.name not in given and any(name in given for name in f.metadata["reset_by"]):
            given[f.name] = None
    return method.config(**given)


def parse_config(method: Method, argv: list[str] | None = None):
    return make_config(method, **vars(command_line(method).parse_args(argv)))


def require(cfg: RunConfig, at_least_1=(), at_least_0=(), positive=()) -> None:
    """Refuse, with one line naming the flag, a setting outside its range."""
    for names, ok, rule in (
        (at_least_1, lambda v: v >= 1, "must be at least 1"),
        (at_least_0, lambda v: v >= 0, "must be 0 or more"),
        (positive, lambda v: v > 0 and math.isfinite(v), "must be positive and finite"),
    ):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise UsageError(f"{flag(name)} {rule} (got {getattr(cfg, name)})")


def default_image_size(dataset: str) -> int:
    """--image-size when not given: the 32x32 datasets' own size, 224 (ImageNet's) for the others."""
    return 32 if dataset in SMALL_IMAGE_DATASETS else 224


def default_stem(image_size: int) -> str:
    """--stem when not given: the CIFAR stem keeps a 32x32 image's detail; larger images take ImageNet's."""
    return "cifar" if image_size == 32 else "imagenet"


def check_data(method: Method, cfg: RunConfig) -> RunConfig:
    """Refuse a dataset or network the method or the data cannot take; return the config with the defaults that
    depend on them resolved: the primary task's classes (primary_level), the image size, the ResNets' stem."""
    if cfg.dataset not in DATASETS:
        raise UsageError(f"--dataset {cfg.dataset!r} is not one of {', '.join(DATASETS)}")
    if cfg.backbone not in method.backbones:
        raise UsageError(
            f"--backbone {cfg.backbone}: {method.name} is defined on {', '.join(method.backbones)} only"
            + (f" ({method.backbones_because})" if method.backbones_because else "")
        )
    if cfg.dataset != "cifar100" and method.cifar100_only:
        raise UsageError(f"--dataset {cfg.dataset}: {method.name} runs on cifar100 only ({method.cifar100_only})")
    if not 0 < cfg.train_fraction <= 1:
        raise UsageError(f"--train-fraction must be in (0, 1] (got {cfg.train_fraction})")
    if cfg.dataset == "cifar100":
        primary_level = 20 if cfg.primary_level is None else cfg.primary_level
    else:
        try:
            primary_level = dataset_classes(cfg.dataset, cfg.data_root)
        except DatasetProblem as error:
            raise UsageError(str(error)) from None
        for name in ("primary_level", "aux_level"):
            if getattr(cfg, name, None) not in (None, primary_level if name == "primary_level" else None):
                raise UsageError(
                    f"{flag(name, getattr(cfg, name))} picks a level of CIFAR-100's hierarchy; on {cfg.dataset} the "
                    f"primary task is its {primary_level} classes: drop {flag(name)} (in Config: None)"
                )
    small = cfg.dataset in SMALL_IMAGE_DATASETS
    image_size = cfg.image_size or default_image_size(cfg.dataset)
    if image_size < 32:
        raise UsageError(f"--image-size must be at least 32 (got {image_size})")
    if cfg.backbone == "vit_b_16" and image_size % 16:
        raise UsageError(f"--image-size {image_size}: vit_b_16 cuts images into 16x16 patches; give a multiple of 16")
    if cfg.stem is not None and cfg.backbone not in RESNETS:
        raise UsageError(f"--stem chooses the first layers of resnet18 and resnet50, not of {cfg.backbone}; drop it")
    stem = (cfg.stem or default_stem(image_size)) if cfg.backbone in RESNETS else None
    if cfg.pretrained and cfg.backbone == "vgg16":
        raise UsageError(
            "--pretrained loads torchvision's ImageNet weights for resnet18, resnet50 and vit_b_16; the paper's "
            "VGG-16 learns from scratch: choose one of those --backbone"
        )
    if cfg.data_path == "device" and not (small and image_size == 32):
        raise UsageError(
            f"--data-path device holds 32x32 datasets on the device; {cfg.dataset} at image size {image_size} is read "
            "from its files: use --data-path loader"
        )
    return dataclasses.replace(cfg, primary_level=primary_level, image_size=image_size, stem=stem)


def check_method(method: Method, cfg: RunConfig) -> RunConfig:
    """The data settings resolved (check_data), then the method's own checks (check_config)."""
    return method.check_config(check_data(method, cfg))


def paper_data(cfg: RunConfig) -> bool:
    """Whether a checked config trains on the paper's data and network: all of CIFAR-100, 32x32, its backbone."""
    return not data_tag(cfg)


def data_tag(cfg: RunConfig) -> str:
    """The data and network settings of a checked config that differ from the paper's, as a run name writes them
    (e.g. cifar10-resnet18-frac0.1); empty for the paper's."""
    parts = [cfg.dataset] if cfg.dataset != "cifar100" else []
    parts += [cfg.backbone] if cfg.backbone != cfg.paper_backbone else []
    if cfg.stem is not None and cfg.stem != default_stem(cfg.image_size):
        parts.append(f"{cfg.stem}stem")
    parts += ["pretrained"] if cfg.pretrained else []
    parts += [f"size{cfg.image_size}"] if cfg.image_size not in (None, default_image_size(cfg.dataset)) else []
    parts += [f"frac{cfg.train_fraction:g}"] if cfg.train_fraction != 1 else []
    return "-".join(parts)


def primary_labels(labels: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """A batch's primary-task labels: the hierarchy's level --primary-level on CIFAR-100, the dataset's classes
    (labels' only column) on the others."""
    return labels[:, level_index(cfg.primary_level) if cfg.dataset == "cifar100" else 0]


def check_settings(method: Method, cfg: RunConfig) -> RunConfig:
    """The data's and the method's checks (check_method), then the shared run settings'."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag(f.name)} must be a finite number (got {value})")
    cfg = check_method(method, cfg)
    require(cfg, at_least_0=("limit_batches",) + (("workers",) if cfg.workers is not None else ()))
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it over; give one of them")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, the range every seeded generator accepts")
    if cfg.run_name and not RUN_NAME.fullmatch(cfg.run_name):
        raise UsageError(
            f"--run-name {cfg.run_name!r} is not a plain folder name: use letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit (the run is written to --results-dir/<run-name>)"
        )
    if len(cfg.run_name) > MAX_RUN_NAME:
        raise UsageError(f"--run-name has {len(cfg.run_name)} characters; at most {MAX_RUN_NAME} make a folder name")
    if cfg.run_name in RESERVED_RUN_NAMES:
        raise UsageError(
            f"--run-name {cfg.run_name} is reserved: {RESERVED_RUN_NAMES[cfg.run_name]} in "
            f"<results-dir>/{cfg.run_name}; choose another --run-name"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise UsageError(f"--device {cfg.device!r} is not one of auto, cpu, cuda, cuda:N")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    return cfg


def edited_settings(method: Method, cfg: RunConfig) -> dict:
    """The settings that change the result and differ from the paper's (fixed) values, by name."""
    paper = {**method.paper_settings(cfg), "amp": False}
    return {name: getattr(cfg, name) for name in sorted(paper) if getattr(cfg, name) != paper[name]}


def default_run_name(method: Method, cfg: RunConfig) -> str:
    """run_name_stem(cfg); a short hash of the settings that differ from the paper's, if any; -limitN for
    a run of --limit-batches N. The same settings give the same name again (so --resume finds the run)."""
    name = method.run_name_stem(cfg)
    if data_tag(cfg):
        name += f"-{data_tag(cfg)}"
    edited = edited_settings(method, cfg)
    if edited:
        name += "-" + hashlib.sha256(json.dumps(edited, sort_keys=True).encode()).hexdigest()[:8]
    if cfg.limit_batches:
        name += f"-limit{cfg.limit_batches}"
    return name


def not_comparable(method: Method, cfg: RunConfig, epochs_completed: int) -> list[str]:
    """Why this run's accuracy cannot be set beside the published figures (empty: it can)."""
    reasons = [flag(name, value) for name, value in edited_settings(method, cfg).items()]
    if cfg.limit_batches:
        reasons.append(flag("limit_batches", cfg.limit_batches))
    if is_synthetic(cfg.dataset, cfg.data_root):
        reasons.append("synthetic data")
    if epochs_completed != PAPER_EPOCHS:
        reasons.append(f"{epochs_completed} of the paper's {PAPER_EPOCHS} epochs")
    return reasons


# ---------------------------------------------------------------------------------------------
# Devices, seeds, data


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
    return torch.device(name)


def configure_backends(cfg: RunConfig, device: torch.device) -> None:
    """Seeds, and the speed/determinism trade-off of cuDNN and cuBLAS."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = cfg.deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic


def load_datasets(cfg: RunConfig):
    """The train set (with its augmentation) and the test set of --dataset; a dataset that is missing, corrupt or
    cannot be downloaded is refused in one line that says what to do."""
    name, folder = DATASET_NAMES[cfg.dataset], dataset_folder(cfg.dataset, cfg.data_root)
    train_transform, test_transform = dataset_transforms(cfg.dataset, cfg.image_size)
    # The CIFAR archives hold both splits: the train set's download fetches the test set too.
    test_download = cfg.download and cfg.dataset not in ("cifar100", "cifar10")
    try:
        train_set = open_dataset(cfg.dataset, cfg.data_root, True, train_transform, cfg.download)
        test_set = open_dataset(cfg.dataset, cfg.data_root, False, test_transform, test_download)
    except DatasetProblem as error:
        raise UsageError(str(error)) from None
    except ImportError as error:
        raise UsageError(
            f"--dataset {cfg.dataset} needs the {error.name or 'missing'} package to read its files: "
            "pip install -r requirements-extras.txt"
        ) from None
    except (URLError, OSError) as error:
        where = "cifar-100-python/" if cfg.dataset == "cifar100" else f"{folder.name}/"
        raise UsageError(
            f"could not download {name} into '{cfg.data_root}' ({error}); download it yourself and extract it "
            f"there, or point --data-root at a folder that holds {where}"
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
        raise UsageError(
            f"{name} not found or corrupted in '{folder}'; {hint}, or point --data-root elsewhere"
        ) from None
    return train_set, test_set


def stratified_fraction(classes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n) of each class's n images (at least one), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(classes):
        members = np.flatnonzero(classes == label)
        kept.append(rng.choice(members, size=max(1, round(fraction * len(members))), replace=False))
    return np.sort(np.concatenate(kept))


# ---------------------------------------------------------------------------------------------
# Backbones: the torchvision networks a script's Trunk may hold instead of its own VGG-16 blocks


def headless(network: nn.Module) -> nn.Module:
    """A torchvision ResNet or ViT without its classifier (images -> features); `num_features` says how many."""
    if isinstance(network, torchvision.models.VisionTransformer):
        network.num_features, network.heads = network.hidden_dim, nn.Identity()
    else:
        network.num_features, network.fc = network.fc.in_features, nn.Identity()
    return network


def make_backbone(cfg: RunConfig) -> nn.Module | None:
    """--backbone as a headless torchvision network, or None for the paper's VGG-16 (the Trunk's own blocks).

    The CIFAR stem (3x3 stride-1 first convolution, no max-pool) keeps the detail of a 32x32 image that the
    ImageNet stem's 4x downsampling loses. ViT-B/16 is built at the run's image size; ImageNet weights (made at
    224) get their position embeddings interpolated to it."""
    if cfg.backbone == "vgg16":
        return None
    weights = "DEFAULT" if cfg.pretrained else None
    if cfg.backbone == "vit_b_16":
        network = torchvision.models.vit_b_16(image_size=cfg.image_size)
        if cfg.pretrained:
            state = torchvision.models.vit_b_16(weights=weights).state_dict()
            network.load_state_dict(interpolate_embeddings(cfg.image_size, 16, state))
        return headless(network)
    network = getattr(torchvision.models, cfg.backbone)(weights=weights)
    if cfg.stem == "cifar":
        network.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        network.maxpool = nn.Identity()
    return headless(network)


@dataclass
class Loaders:
    """A run's batches: train, test, and the developing set the method holds out of training (or None)."""

    train: object
    test: object
    dev: object | None = None
    auxiliary: list = field(default_factory=list)  # split_data's auxiliary train sets, each shuffled by its own RNG


def default_workers() -> int:
    """The CPUs this process may use, at most 4: more would only make the DataLoader warn."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus)


def make_loaders(
    cfg: RunConfig, device: torch.device, held_out: Callable | None = None, split_data: Callable | None = None
) -> Loaders:
    """Batches of (images, labels[N, 4]); every shuffled loader carries its RNG as `.generator`. `held_out`
    (train_set, cfg) -> indices: training images kept apart as the developing set, unaugmented. `split_data`
    (Method.split_data): the method's own train and test sets and its auxiliary train sets (augmented, shuffled)."""
    train_set, test_set = load_datasets(cfg)
    if cfg.train_fraction < 1:  # stratified by the finest labels, so every level keeps its class balance
        train_set = train_set.subset(stratified_fraction(train_set.labels[:, -1].numpy(), cfg.train_fraction, cfg.seed))
    auxiliary_sets = []
    if split_data is not None:
        train_set, test_set, auxiliary_sets = split_data(train_set, test_set, cfg)
    dev_set = None
    if held_out is not None and len(dev_indices := held_out(train_set, cfg)):
        train_set, dev_set = train_set.split(dev_indices, held_out_transform=test_set.transform)
    smallest = min([len(train_set), *(len(s) for s in auxiliary_sets)])
    if cfg.batch_size > smallest:
        raise UsageError(
            f"--batch-size {cfg.batch_size} is more than the {plural(smallest, 'training image')}"
            f"{' of the smallest training set' if auxiliary_sets else ''}; choose at most {smallest}"
        )
    fits = cfg.dataset in SMALL_IMAGE_DATASETS and cfg.image_size == 32  # check_data refused device otherwise
    on_device = cfg.data_path == "device" or (cfg.data_path == "auto" and device.type == "cuda" and fits)
    flip = cfg.dataset != "svhn"  # digits are not mirror-symmetric

    def loader(dataset, shuffle: bool, augment: bool, seed: int = cfg.seed):
        if on_device:
            return DeviceLoader(dataset, cfg.batch_size, device, shuffle=shuffle, augment=augment, seed=seed, flip=flip)
        generator = torch.Generator()
        generator.manual_seed(seed)
        # Workers are re-seeded from `generator` every epoch (no persistent workers) so a resumed run repeats exactly.
        workers = default_workers() if cfg.workers is None else cfg.workers
        common = dict(batch_size=cfg.batch_size, num_workers=workers, pin_memory=device.type == "cuda")
        if not shuffle:
            return torch.utils.data.DataLoader(dataset, shuffle=False, **common)
        return torch.utils.data.DataLoader(dataset, shuffle=True, generator=generator, **common)

    dev = loader(dev_set, shuffle=True, augment=False) if dev_set is not None else None
    # Each auxiliary set its own stream of shuffles, not the train loader's seed (equal sizes would shuffle alike).
    seeds = [int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0]) for i in range(1, len(auxiliary_sets) + 1)]
    auxiliary = [loader(s, shuffle=True, augment=True, seed=seed) for s, seed in zip(auxiliary_sets, seeds)]
    return Loaders(
        loader(train_set, shuffle=True, augment=True), loader(test_set, shuffle=False, augment=False), dev, auxiliary
    )


def batches(loader, cfg: RunConfig, device: torch.device, phase: str | None = "train"):
    """(step, images, labels) of the loader's batches on `device`, at most --limit-batches of them; `phase`
    names the pass on the progress line (None: a pass the line does not show)."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    steps = min(len(loader), cfg.limit_batches or len(loader))
    for step, (images, labels) in enumerate(loader):
        if step == steps:
            return
        if phase is not None:
            progress.update(phase, step, steps, len(images))
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        yield step, images, labels.to(device, non_blocking=True)


class Progress:
    """One line on a terminal, redrawn at most once a second: the phase, step of steps, images per second,
    the time left in the epoch and in the run. Silent when stderr is not a terminal (a log file, a pipe)."""

    def __init__(self):
        self.start(None, 0)

    def start(self, stream, epochs: int) -> None:
        """Draw on `stream` (if it is a terminal) for a run of `epochs`; None: draw nothing."""
        self.stream = stream
        self.enabled = stream is not None and stream.isatty()
        self.epochs, self.epoch, self.last_epoch_seconds = epochs, 0, None
        self.epoch_started = self.phase_started = self.drawn = 0.0
        self.phase, self.images = "", 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_started, self.phase = epoch, time.perf_counter(), ""

    def end_epoch(self) -> None:
        self.last_epoch_seconds = time.perf_counter() - self.epoch_started
        self.clear()

    def update(self, phase: str, step: int, steps: int, batch: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if phase != self.phase:
            self.phase, self.phase_started, self.images = phase, now, 0
        done, self.images = self.images, self.images + batch  # the steps before this one are done
        if now - self.drawn < 1.0 or step == 0:
            return
        self.drawn, elapsed = now, now - self.phase_started
        pass_left = elapsed / step * (steps - step)
        epoch_left = max(pass_left, (self.last_epoch_seconds or 0) - (now - self.epoch_started))
        later = None if self.last_epoch_seconds is None else (self.epochs - self.epoch) * self.last_epoch_seconds
        run_left = "?" if later is None else duration(epoch_left + later)
        line = (
            f"epoch {self.epoch}/{self.epochs} {phase}: step {step + 1}/{steps}, {done / elapsed:.0f} img/s, "
            f"epoch left {duration(epoch_left)}, run left {run_left}"
        )
        self.stream.write(f"\r\033[K{line}")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = 0.0


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


progress = Progress()  # run() sets it up for the run's duration; off outside a run


# ---------------------------------------------------------------------------------------------
# Mixed precision and CUDA graphs


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 autocast on CUDA with --amp; a no-op otherwise."""
    if cfg.amp and device.type == "cuda":
        # No weight-cast cache: CUDA graph capture needs every cast inside the captured step.
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


class StepGraphs:
    """Replays each step function as a CUDA graph: one launch per batch instead of hundreds of kernels.

    At batch size 100 the GPU finishes VGG-16's kernels faster than Python can launch them; a graph
    removes that overhead without changing the arithmetic. A step (a function of a batch's images and
    labels that returns tensors) runs eagerly for its first WARMUP calls at each input shape (cuDNN
    autotuning, lazy initialisation), is then captured once and replayed with the batch copied into
    the graph's own input tensors. The learning rates a step reads are baked into its capture, so every
    graph is dropped when an optimiser in `state` changes its learning rate. Parameters must be updated
    in place (torch.optim and load_state_dict do). The returned tensors are overwritten by the next
    replay of the same step. Disabled (every call eager) off CUDA and with --no-cuda-graphs.
    """

    WARMUP = 3

    def __init__(self, state: dict, device: torch.device, enabled: bool = True):
        self.enabled = enabled and device.type == "cuda"
        self.device = device
        self.optimizers = [obj for obj in state.values() if isinstance(obj, torch.optim.Optimizer)]
        self.learning_rates: list[float] = []
        self.graphs: dict[tuple, tuple] = {}
        self.calls: dict[tuple, int] = {}
        self.side_stream = torch.cuda.Stream(device) if self.enabled else None

    def __call__(self, name: str, step, images: torch.Tensor, labels: torch.Tensor) -> dict:
        if not self.enabled:
            return step(images, labels)
        learning_rates = [group["lr"] for optimizer in self.optimizers for group in optimizer.param_groups]
        if learning_rates != self.learning_rates:
            self.graphs.clear()
            self.calls.clear()
            self.learning_rates = learning_rates
        key = (name, tuple(images.shape), tuple(labels.shape))
        if key not in self.graphs:
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] <= self.WARMUP:
                # Warm-up on a side stream, as torch.cuda.graph requires of the work it will capture.
                main_stream = torch.cuda.current_stream(self.device)
                self.side_stream.wait_stream(main_stream)
                with torch.cuda.stream(self.side_stream):
                    out = step(images, labels)
                main_stream.wait_stream(self.side_stream)
                return out
            static_images, static_labels = images.clone(), labels.clone()
            graph = torch.cuda.CUDAGraph()
            # Records the kernels, runs nothing. "thread_local": the DataLoader's pin-memory thread may
            # allocate pinned memory meanwhile, which the default mode would count as breaking the capture.
            with torch.cuda.device(self.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = step(static_images, static_labels)
            self.graphs[key] = (graph, static_images, static_labels, outputs)
        graph, static_images, static_labels, outputs = self.graphs[key]
        static_images.copy_(images)
        static_labels.copy_(labels)
        graph.replay()
        return dict(outputs)


# ---------------------------------------------------------------------------------------------
# Meters and evaluation


class Meter:
    """Sums per-sample metrics on the device; one host sync per epoch."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, batch_mean: torch.Tensor, n: int) -> None:
        self.sums[name] = self.sums.get(name, 0) + batch_mean.detach().float() * n
        self.counts[name] = self.counts.get(name, 0) + n

    def means(self) -> dict[str, float]:
        return {name: (total / self.counts[name]).item() for name, total in self.sums.items()}


class FiniteGuard:
    """Records the first step whose loss is not finite, without a host sync per step."""

    CHECK_EVERY = 50

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def watch(self, loss: torch.Tensor, epoch: int, phase: str, step: int) -> None:
        bad = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad, step, self.first_bad)
        if (step + 1) % self.CHECK_EVERY == 0:
            self.check(epoch, phase)

    def check(self, epoch: int, phase: str) -> None:
        step = int(self.first_bad)
        if step >= 0:
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, {phase} step {step + 1}; the run stopped")


@torch.inference_mode()
def evaluate(method: Method, state: dict, graphs: StepGraphs, loader, cfg: RunConfig, device: torch.device) -> dict:
    """The method's eval_step over the test set, averaged per image; the network back in training mode."""
    meter = Meter()
    state["model"].eval()
    step = functools.partial(method.eval_step, state, cfg=cfg)
    for _, images, labels in batches(loader, cfg, device, phase="test"):
        for name, value in graphs("evaluate", step, images, labels).items():
            meter.add(name, value, images.shape[0])
    state["model"].train()
    return meter.means()


def check_finite(metrics: dict[str, float], epoch: int) -> None:
    """Every recorded number must be finite, the test metrics as much as the training losses."""
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteLoss(f"non-finite {', '.join(bad)} at epoch {epoch}; the run stopped")


# ---------------------------------------------------------------------------------------------
# Results, checkpoints, resume


def write_atomic(path: Path, write) -> None:
    """write(tmp_path), flushed to disk, then renamed over `path`: a reader never sees a half-written file,
    and a crash, a signal or power loss leaves the old file or the new one. A leftover temporary file (a
    killed process) is removed when the next run opens the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private: give it the mode any new file gets
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself
    finally:
        os.close(folder)


def json_text(obj) -> str:
    """Strict JSON: every number is finite (run() checks them), so any JSON parser reads it."""
    return json.dumps(obj, indent=1, allow_nan=False) + "\n"


def rng_state(loaders: Loaders) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        "torch": torch.get_rng_state(),
        "loader": loaders.train.generator.get_state(),
    }
    if loaders.dev is not None:
        state["dev_loader"] = loaders.dev.generator.get_state()
    if loaders.auxiliary:
        state["auxiliary_loaders"] = [loader.generator.get_state() for loader in loaders.auxiliary]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, loaders: Loaders) -> None:
    random.setstate(state["python"])
    np.random.set_state(tuple(v.numpy() if isinstance(v, torch.Tensor) else v for v in state["numpy"]))
    torch.set_rng_state(state["torch"])
    loaders.train.generator.set_state(state["loader"])
    if loaders.dev is not None:
        loaders.dev.generator.set_state(state["dev_loader"])
    for loader, saved in zip(loaders.auxiliary, state.get("auxiliary_loaders", []), strict=True):
        loader.generator.set_state(saved)
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def summarize(method: Method, history: list[dict], cfg: RunConfig) -> dict:
    """Final-epoch test accuracy and the mean over the last 5 epochs (the paper's way), in %; the published
    figures for this configuration, and whether this run is one they can be compared with."""
    accs = [100 * r["test_primary_acc"] for r in history]
    reasons = not_comparable(method, cfg, len(history))
    published = method.published_accuracy(cfg)
    best = max(range(len(accs)), key=accs.__getitem__)
    return {
        "epochs_completed": len(history),
        "final_test_primary_acc": accs[-1],
        "last5_mean_test_primary_acc": sum(accs[-5:]) / len(accs[-5:]),
        # What the MAOAL authors report: the best epoch, chosen on the test set (optimistic; not this project's).
        "best_test_primary_acc_chosen_on_test_set": accs[best],
        "best_epoch": history[best]["epoch"],
        "published_test_primary_acc": published,
        "unpublished_because": ""
        if published
        else method.unpublished_because(cfg)
        if paper_data(cfg)
        else f"the papers report no figure for this data and network ({data_tag(cfg)})",
        "comparable_with_published": not reasons,
        "not_comparable_because": reasons,
    }


def summary_line(summary: dict) -> str:
    published = "; ".join(f"{v:.1f}% ({k})" for k, v in summary["published_test_primary_acc"].items())
    if not published:
        beside = "published: none for this configuration" + (
            f" ({summary['unpublished_because']})" if summary.get("unpublished_because") else ""
        )
    elif summary["comparable_with_published"]:
        beside = f"published: {published}"
    else:
        beside = f"not comparable with the published figures ({', '.join(summary['not_comparable_because'])})"
    last = plural(min(5, summary["epochs_completed"]), "epoch")
    best = (
        f" (best {summary['best_test_primary_acc_chosen_on_test_set']:.2f}% at epoch {summary['best_epoch']}, "
        "chosen on the test set)"
        if "best_epoch" in summary
        else ""
    )
    return (
        f"final test primary accuracy {summary['final_test_primary_acc']:.2f}%, mean of the last "
        f"{last} {summary['last5_mean_test_primary_acc']:.2f}%{best} | {beside}"
    )


def settings_as_checked(method: Method, saved: dict) -> dict:
    """A checkpoint's settings as check_config leaves them (psi parsed, levels resolved), so that the same
    experiment compares equal however its settings were written (--psi 5 or twenty 5s)."""
    names = {f.name for f in dataclasses.fields(method.config)}
    try:
        return asdict(check_method(method, method.config(**{k: v for k, v in saved.items() if k in names})))
    except (UsageError, TypeError, ValueError):
        return saved


def load_checkpoint(method: Method, path: Path, cfg: RunConfig) -> dict:
    """The checkpoint at `path`, after checking it belongs to this configuration; refuses with one line."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["config"]
        checkpoint["next_epoch"]
    except Exception as error:
        raise UsageError(
            f"--resume: '{path}' is unreadable (truncated or corrupt: {type(error).__name__}); "
            f"start a new run with another --run-name, or --overwrite to replace it"
        ) from None
    if saved.get("method") != method.name:
        raise UsageError(
            f"--resume: '{path}' is a {saved.get('method')} run, not {method.name}; use another --run-name"
        )
    current, saved = asdict(cfg), {**saved, **settings_as_checked(method, saved)}
    differ = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if differ:
        was = " ".join(flag(k, saved.get(k)) for k in differ)
        now = " ".join(flag(k, current[k]) for k in differ)
        raise UsageError(
            f"--resume: '{path}' was written with {was} but this run has {now}; "
            f"resume with the checkpoint's settings, or use another --run-name"
        )
    annealed = cosine_epochs(checkpoint)
    if annealed is not None and annealed != cfg.epochs:  # the schedule's length is in the checkpoint, not in cfg
        raise UsageError(
            f"--resume: '{path}' anneals its learning rate to 0 over {plural(annealed, 'epoch')} (a cosine "
            f"schedule fixed when the run started), so it cannot go on to --epochs {cfg.epochs}: resume with "
            f"--epochs {annealed}, or train longer in a new run (another --run-name)"
        )
    return checkpoint


def cosine_epochs(checkpoint: dict) -> int | None:
    """The epochs a checkpointed cosine schedule runs over (CosineAnnealingLR's T_max), or None: none has one."""
    return next((entry["T_max"] for entry in checkpoint.values() if isinstance(entry, dict) and "T_max" in entry), None)


def restore(state: dict, loaders: Loaders, checkpoint: dict, path: Path) -> tuple[list[dict], int]:
    """Load every saved entry of `state` and the RNG states; returns the metrics so far and the next epoch."""
    saved = [key for key in state if not key.startswith("forward_")]
    missing = [key for key in (*saved, "rng", "epochs") if key not in checkpoint]
    if missing:
        raise UsageError(
            f"--resume: '{path}' is incomplete (no {', '.join(missing)}); "
            f"start a new run with another --run-name, or --overwrite to replace it"
        )
    try:
        for key in saved:
            state[key].load_state_dict(checkpoint[key])
        set_rng_state(checkpoint["rng"], loaders)
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"--resume: '{path}' does not fit this run ({reason}); use another --run-name") from None
    return checkpoint["epochs"], checkpoint["next_epoch"]


# ---------------------------------------------------------------------------------------------
# The run folder: created, locked, cleaned


def lock_record(run_dir: Path) -> tuple[int, str | None] | None:
    """(pid, host) written in `run_dir`'s lock file by the run that took it (host None in older files), or None."""
    try:
        pid, *host = (Path(run_dir) / LOCK_FILE).read_text().split()
        return int(pid), (host[0] if host else None)
    except (OSError, ValueError):
        return None


def lock_holder(run_dir: Path) -> int | None:
    """The pid of the live process on this host that holds `run_dir`'s lock, or None. A holder on another host
    (a shared filesystem, a cluster's nodes) cannot be checked from here and gives None."""
    record = lock_record(run_dir)
    if record is None or record[1] not in (None, socket.gethostname()):
        return None
    try:
        os.kill(record[0], 0)
    except OSError:
        return None
    return record[0]


class RunFolder:
    """The run's folder, held by this process alone while the run lasts.

    Entering creates the folder (and any missing parents), checks it is writable, takes an exclusive
    lock on its LOCK_FILE, and removes temporary files a killed run left behind. The lock is a kernel
    lock (flock): a second process refuses with the first one's pid while it lives, and when the holder
    dies, however it dies, the kernel releases it, so a stale lock file is simply taken over. Leaving
    releases the lock and removes the folders entering created if the run wrote nothing into them.
    """

    def __init__(self, path: Path):
        self.path = path
        self.created: list[Path] = []
        self.lock_fd: int | None = None

    def __enter__(self) -> Path:
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.created = missing
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as error:
            self.remove_created()
            raise UsageError(
                f"cannot write results to '{self.path}' ({error.strerror or error}); choose another --results-dir"
            ) from None
        try:
            self.lock()
        except BaseException:
            self.remove_created()
            raise
        for leftover in self.path.glob(".*.tmp"):
            leftover.unlink()
        return self.path

    def lock(self) -> None:
        path = self.path / LOCK_FILE
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid, host = lock_record(self.path) or (None, None)
                where = f" on {host}" if host not in (None, socket.gethostname()) else ""
                raise UsageError(
                    f"'{self.path}' is in use by another run (pid {pid}{where}); wait for it to end, "
                    f"or choose another --run-name"
                ) from None
            # The holder we waited for may have removed the file meanwhile: hold the lock of the file on disk.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.lock_fd = fd

    def __exit__(self, *exc) -> None:
        if self.lock_fd is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)  # removed while held: see lock()
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = None
        self.remove_created()

    def remove_created(self) -> None:
        """Remove the folders this run created, deepest first, if they are still empty."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break


def previous_results(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to lose results, or to write into a folder that holds files no run of this project made."""
    foreign = sorted(path.name for path in run_dir.iterdir() if not RUN_FILES.fullmatch(path.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(
            f"'{run_dir}' holds files no run of this project wrote ({shown}); choose another --run-name or "
            f"--results-dir"
        )
    if cfg.resume or cfg.overwrite:
        return
    if (run_dir / "metrics.json").exists() or (run_dir / "checkpoint.pt").exists():
        raise UsageError(
            f"'{run_dir}' already holds results; use --resume to continue that run, "
            f"another --run-name, or --overwrite to replace it"
        )


def metrics_match(path: Path, checkpoint: dict) -> bool:
    """Whether metrics.json is strict JSON holding the checkpoint's epochs."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not strict JSON")

    try:
        return json.loads(path.read_text(), parse_constant=refuse)["epochs"] == checkpoint["epochs"]
    except (OSError, ValueError, TypeError, KeyError):
        return False


def missing_checkpoint(method: Method, cfg: RunConfig, run_dir: Path, named: bool) -> UsageError:
    """--resume without a checkpoint: where it looked, and, for a default name, what made the name and which
    runs of this method the results folder holds."""
    message = f"--resume: no checkpoint at '{run_dir / 'checkpoint.pt'}'"
    if not named:
        edited = " ".join(flag(name, value) for name, value in edited_settings(method, cfg).items())
        because = f"these settings differ from the paper's: {edited}" if edited else "the paper's settings"
        runs = sorted(p.parent.name for p in Path(cfg.results_dir).glob(f"{method.name}-*/checkpoint.pt"))
        here = f"; {method.name} runs in '{cfg.results_dir}': {', '.join(runs[:5])}" if runs else ""
        message += f" (the default name of this configuration, {because}){here}"
    return UsageError(f"{message}; start without --resume, or check --results-dir and --run-name")


# ---------------------------------------------------------------------------------------------
# Interrupts, faults, provenance, the log


class Interrupted(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class RunFault(Exception):
    """The run could not go on (a full disk, a quota): the last good checkpoint stays; exit code 1."""


@contextlib.contextmanager
def signals_raise():
    """SIGINT, SIGTERM and SIGHUP (a closed terminal, a dropped ssh) raise Interrupted inside the block: the
    run's cleanup and message run as for Ctrl-C."""

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP while the checkpoint and metrics.json are written, so that the two always
    hold the same epochs; deliver them afterwards."""
    received = []
    hold = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in hold}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            raise Interrupted(received[0])


def command(argv: list[str] | None = None) -> list[str]:
    """The command that started this run: the script and its flags (`argv` where main() was handed them)."""
    return ["python", Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]


def resume_command(run_name: str, argv: list[str] | None = None) -> str:
    args = [a for a in command(argv)[2:] if a not in ("--resume", "--overwrite")]
    if "--run-name" not in args and not any(a.startswith("--run-name=") for a in args):
        args += ["--run-name", run_name]
    return shlex.join([*command(argv)[:2], *args, "--resume"])


def code_version() -> dict:
    """The commit of the checkout this code runs from, and whether its tracked files were modified (None and
    None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}
    if commit.returncode != 0 or status.returncode != 0:
        return {"commit": None, "modified": None}
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(device: torch.device, argv: list[str] | None = None) -> dict:
    """Where, when and with what this start (or resume) of the run runs."""
    return {
        "code": code_version(),
        "host": socket.gethostname(),
        "started": now(),
        "ended": None,
        "command": shlex.join(command(argv)),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({processor_name()})",
    }


def processor_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class RunLog:
    """The run folder's log.txt: a header with each start's provenance, then every line the run prints. Kept in
    memory until the run has results on disk (open()): a run that saves nothing leaves no log behind."""

    def __init__(self, path: Path, session: dict, title: str):
        self.path, self.file = path, None
        code = session["code"]
        version = f"{code['commit']}{' (modified)' if code['modified'] else ''}" if code["commit"] else "not a checkout"
        self.pending = [
            f"# {title}, started {session['started']} on {session['host']}",
            f"# command: {session['command']}",
            f"# code: {version}",
            f"# python {session['python']}, torch {session['torch']}, torchvision {session['torchvision']}, "
            f"CUDA {session['cuda']}; device: {session['device']}",
        ]

    def open(self) -> None:
        if self.file is None:
            with contextlib.suppress(OSError):
                self.file = open(self.path, "a")
                self.write(*self.pending)

    def write(self, *lines: str) -> None:
        if self.file is None:
            self.pending += lines
            return
        with contextlib.suppress(OSError, ValueError):  # a full disk loses log lines, not the run
            self.file.write("".join(line.strip("\n") + "\n" for line in lines))
            self.file.flush()

    def say(self, line: str, stream=None) -> None:
        """Print the line (stdout, or `stream`) and log it."""
        with contextlib.suppress(OSError):  # a terminal that went away (SIGHUP)
            print(line, file=stream or sys.stdout, flush=True)
        self.write(line)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


def learning_rates(state: dict) -> dict[str, float]:
    """Each optimiser's current learning rate: lr (the network's), lr_gen, lr_lambda, ..."""
    rates = {}
    for key, obj in state.items():
        if isinstance(obj, torch.optim.Optimizer):
            rates["lr" + (f"_{key.removesuffix('_optimizer')}" if key != "optimizer" else "")] = obj.param_groups[0][
                "lr"
            ]
    return rates


def save(run_dir: Path, checkpoint: dict, metrics: dict) -> None:
    """The checkpoint, then metrics.json, each atomically; a failed write (a full disk) is a RunFault."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)  # in memory first: a full disk then fails with the OSError that says so
    for name, data in (("checkpoint.pt", buffer.getbuffer()), ("metrics.json", json_text(metrics).encode())):
        try:
            write_atomic(run_dir / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
        except OSError as error:
            raise RunFault(f"could not write {name} in {run_dir} ({error.strerror or error})") from None


# ---------------------------------------------------------------------------------------------
# The run


def run(method: Method, cfg: RunConfig, argv: list[str] | None = None) -> dict:
    """The whole experiment: every epoch, its checkpoint and metrics; returns the summary. `argv`: the flags
    main() was handed, for the log and the resume command (default: the process's own)."""
    cfg = check_settings(method, cfg)
    named = bool(cfg.run_name)
    cfg = dataclasses.replace(cfg, run_name=cfg.run_name or default_run_name(method, cfg))
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.results_dir) / cfg.run_name
    checkpoint = None
    if cfg.resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise missing_checkpoint(method, cfg, run_dir, named)
        checkpoint = load_checkpoint(method, run_dir / "checkpoint.pt", cfg)
        if checkpoint["next_epoch"] >= cfg.epochs:  # finished: nothing to write, nor a folder to take
            done = plural(checkpoint["next_epoch"], "epoch")
            cosine = cosine_epochs(checkpoint) is not None
            then = "train longer in a new run" if cosine else "pass a larger --epochs to extend it"
            print(f"'{run_dir}' already finished {done}; {then}")
            summary = summarize(method, checkpoint["epochs"], cfg)
            if not metrics_match(run_dir / "metrics.json", checkpoint):  # damaged or lost: made again from it
                metrics = {key: checkpoint.get(key, []) for key in ("config", "provenance", "epochs")}
                text = json_text({**metrics, "summary": summary})
                with RunFolder(run_dir):
                    write_atomic(run_dir / "metrics.json", lambda tmp: Path(tmp).write_text(text))
                print("rewrote its damaged metrics.json from the checkpoint")
            print(summary_line(summary))
            return summary
    sessions = [*(checkpoint or {}).get("provenance", []), provenance(device, argv)]
    log = RunLog(run_dir / LOG_FILE, sessions[-1], f"{method.name}: {run_dir}")  # written once there are results
    history: list[dict] = []
    saved_epochs, epoch = 0, 0  # the epochs the checkpoint on disk holds; the epoch under way
    try:
        with signals_raise(), RunFolder(run_dir):
            previous_results(run_dir, cfg)
            configure_backends(cfg, device)
            loaders = make_loaders(cfg, device, method.held_out, method.split_data)
            state = method.build(cfg, device)
            start_epoch = 0
            if checkpoint is not None:
                history, start_epoch = restore(state, loaders, checkpoint, run_dir / "checkpoint.pt")
                saved_epochs = start_epoch
            derived = {"method": method.name, "resolved_device": str(device), "torch": str(torch.__version__)}
            record_config = {**asdict(cfg), **method.derived_settings(cfg), **derived}
            if checkpoint is not None:
                log.open()
                log.say(f"resuming {run_dir} at epoch {start_epoch + 1}")
            epoch = start_epoch + 1
            log.say(f"{method.name}: {run_dir} on {device}, {plural(cfg.epochs, 'epoch')}")
            graphs = StepGraphs(state, device, enabled=cfg.cuda_graphs)
            scalars = tensorboard_writer(run_dir) if cfg.tensorboard else None
            progress.start(sys.stderr, cfg.epochs)
            for epoch in range(start_epoch + 1, cfg.epochs + 1):
                started = time.perf_counter()
                progress.start_epoch(epoch)
                rates = learning_rates(state)
                metrics = method.train_epoch(state, graphs, loaders, cfg, device, epoch)
                metrics.update(evaluate(method, state, graphs, loaders.test, cfg, device))
                check_finite(metrics, epoch)
                for obj in state.values():
                    if isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
                        obj.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                history.append({"epoch": epoch, **metrics, **rates, "seconds": time.perf_counter() - started})
                progress.end_epoch()
                sessions[-1]["ended"] = now()
                checkpoint = {key: obj.state_dict() for key, obj in state.items() if not key.startswith("forward_")}
                checkpoint.update(config=record_config, epochs=history, next_epoch=epoch, rng=rng_state(loaders))
                checkpoint.update(provenance=sessions)
                summary = summarize(method, history, cfg)
                metrics_file = {"config": record_config, "provenance": sessions, "epochs": history, "summary": summary}
                with signals_deferred():
                    save(run_dir, checkpoint, metrics_file)
                    saved_epochs = epoch
                    log.open()
                if scalars is not None:
                    for name, value in history[-1].items():
                        scalars.add_scalar(name, value, epoch)
                    scalars.flush()
                log.say(method.epoch_line(history[-1], cfg.epochs))
            summary = summarize(method, history, cfg)
            log.say(summary_line(summary))
            return summary
    except (Interrupted, RunFault, NonFiniteLoss) as error:
        progress.clear()
        kept = (
            f"the checkpoint after epoch {saved_epochs} in {run_dir} is kept" if saved_epochs else "nothing was saved"
        )
        again = f"Resume with: {resume_command(cfg.run_name, argv)}"
        if isinstance(error, NonFiniteLoss):
            log.write(f"error: {error}; {kept}. {error.hint}")
            raise UsageError(f"{error}; {kept}. {error.hint}") from None
        if isinstance(error, RunFault):
            log.say(f"error: {error}; {kept}" + (f". {again}" if saved_epochs else ""), stream=sys.stderr)
            raise SystemExit(1) from None
        if saved_epochs:
            where = f"after epoch {epoch} was saved" if saved_epochs == epoch else f"in epoch {epoch}"
            line = f"interrupted {where}; the checkpoint after epoch {saved_epochs} is in {run_dir}. {again}"
        else:
            line = f"interrupted{f' in epoch {epoch}' if epoch else ''}; no epoch was completed and nothing was saved"
        log.say("\n" + line, stream=sys.stderr)
        raise SystemExit(128 + error.signum) from None
    finally:
        progress.start(None, 0)
        log.close()


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into the run folder (tensorboard is an optional extra; check_settings checked it)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir))


def smoke(method: Method, cfg: RunConfig) -> dict:
    """Train 2 small batches on CPU on synthetic data in a temporary folder; nothing is left behind. Fails when
    the test loss is not finite or rose above SMOKE_TOLERANCE times the untrained network's. 1,000 training
    images (50 a class) leave room for a method's held-out developing set at its default size."""
    with tempfile.TemporaryDirectory(prefix=f"{method.name}-smoke-") as tmp:
        if cfg.dataset in DATASETS and not (cfg.dataset != "cifar100" and method.cifar100_only):
            make_synthetic(cfg.dataset, Path(tmp) / "data", n_train=1000, n_test=100, seed=cfg.seed)
        folders = dict(data_root=str(Path(tmp) / "data"), results_dir=str(Path(tmp) / "results"))
        cfg = dataclasses.replace(check_method(method, dataclasses.replace(cfg, **folders)), **SMOKE_SETTINGS)
        device = torch.device("cpu")
        configure_backends(cfg, device)
        untrained = method.build(cfg, device)
        loaders = make_loaders(cfg, device, method.held_out)
        before = evaluate(method, untrained, StepGraphs(untrained, device), loaders.test, cfg, device)
        summary = run(method, cfg)
        after = json.loads((Path(cfg.results_dir) / cfg.run_name / "metrics.json").read_text())["epochs"][-1]
    if not after["test_primary_loss"] <= SMOKE_TOLERANCE * before["test_primary_loss"]:
        raise UsageError(
            f"smoke test failed: the test loss went from {before['test_primary_loss']:.4g} (untrained) to "
            f"{after['test_primary_loss']:.4g}; training diverged (check the flags given with --smoke)"
        )
    print("smoke test passed: the install trains and evaluates")
    return summary


def main(method: Method, argv: list[str] | None = None) -> None:
    """The script's command line: parse, then run (or smoke); a refusal is one line on stderr, exit code 2."""
    try:
        given = vars(command_line(method).parse_args(argv))
        if given.get("smoke") and SMOKE_SETS & set(given):
            fixed = " ".join(flag(name) for name in sorted(SMOKE_SETS & set(given)))
            raise UsageError(
                f"--smoke sets {fixed} itself (2 batches on CPU, synthetic data in a temporary folder); drop them"
            )
        cfg = make_config(method, **given)
        smoke(method, cfg) if cfg.smoke else run(method, cfg, argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
