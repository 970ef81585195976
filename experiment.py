"""The run machinery the model scripts call: flags, devices, data, CUDA graphs, checkpoints and exact resume, the run
folder and its lock, signals, provenance, progress. A library, as Lightning Fabric is to a user's loop: each script's
main() holds its own loop and calls what it needs here; nothing here imports or calls a script.

    def main(argv=None):
        with experiment.Run(argv) as run:                     # a refusal: one line, exit 2; Ctrl-C: the resume line
            cfg = check_config(run.parse(Config, __doc__))    # the flags into Config, checked by the script
            run.open("single", cfg, stem=..., paper=...)      # the run folder, its lock, the log, seeds, provenance
            data = run.loaders(*run.datasets())
            model, optimizer, scheduler = build(cfg, run.device)
            saved = {"model": model, "optimizer": optimizer, "scheduler": scheduler}   # what checkpoint.pt holds
            run.resume(saved)                                 # --resume: their states and the RNGs, from it
            graphs = experiment.StepGraphs([optimizer], run.device, cfg.cuda_graphs)
            for epoch in run.epochs():
                metrics = train_epoch(...) | evaluate(...)
                scheduler.step()
                record = run.save(saved, metrics)             # checkpoint.pt and metrics.json, atomically
                run.say(epoch_line(record, cfg.epochs))
            run.finish()                                      # the summary line

The step functions take from here what they need by name: `batches` (which also draws the progress line on a
terminal), `Meter`, `FiniteGuard`, `StepGraphs`, `autocast`, `make_backbone`. Behaviour and every refusal:
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
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
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torchvision.models.vision_transformer import interpolate_embeddings

import create_dataset
from create_dataset import DATASETS, DatasetProblem, Loaders

PAPER_EPOCHS = 200  # the paper reports the mean test accuracy of the last 5 of 200 epochs
MAX_IMAGE_SIZE = 1024  # pixels: --image-size's upper bound
MAX_SEED = 2**32 - 1  # numpy's limit, the narrowest of the seeded generators
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a plain folder name, created inside --results-dir
MAX_RUN_NAME = 200  # characters: a file system's 255-byte names, less the temporary files' prefix and suffix
RESERVED_RUN_NAMES = {
    "figure3": "figure3.py keeps its report, picture and job logs",
    "tables": "tables.py keeps its reports and job logs",
}
LOCK_FILE = ".lock"
# What a run writes into its folder; a folder holding anything else was not made by a run of this project.
RUN_FILES = re.compile(r"metrics\.json|checkpoint\.pt|log\.txt|\.lock|\..*\.tmp|events\.out\.tfevents\..*")
# Settings a resumed run may change (none changes the result); every other one must match the checkpoint.
RESUMABLE_CHANGES = {"epochs", "resume", "overwrite", "data_root", "download", "workers", "cuda_graphs"}
RESUMABLE_CHANGES |= {"results_dir", "tensorboard"}
SMOKE_SETTINGS = dict(download=False, device="cpu", epochs=1, batch_size=20, limit_batches=2, workers=0)
SMOKE_SETTINGS |= dict(run_name="smoke", resume=False, overwrite=False)
SMOKE_SETS = {*SMOKE_SETTINGS, "data_root", "results_dir"}  # flags --smoke refuses: it sets them
# --smoke fails above this many times the untrained test loss: two steps move a sound network's up to about 10x (6.37
# -> 58.8 for Single at --lr 0.1), a diverging one's by orders of magnitude (docs/reliability.md, "The smoke test").
SMOKE_TOLERANCE = 100
# The settings that choose the data and the network, every script's: grouped in --help, named in run names.
DATA_SETTINGS = ("dataset", "data_root", "download", "train_fraction", "image_size", "backbone", "stem", "pretrained")
BACKBONES = ("vgg16", "resnet18", "resnet50", "vit_b_16")  # vgg16: the paper's; the others torchvision's
RESNETS = ("resnet18", "resnet50")


class UsageError(Exception):
    """Bad input or a refused action: shown as one line, exit code 2."""


class NonFiniteLoss(Exception):
    """A loss became NaN or infinite: the run stops, the last good checkpoint stays; `hint` says what to change."""

    def __init__(self, message: str, hint: str = "Try a smaller --lr, or --no-amp"):
        super().__init__(message)
        self.hint = hint


class Interrupted(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class RunFault(Exception):
    """The run could not go on (a full disk, a quota): the last good checkpoint stays; exit code 1."""


class _Finished(Exception):
    """A --resume of a finished run: its summary is printed, and the `with Run` block ends there."""


# --- Settings: Config's fields as flags, named as the user set them ----------------------------------------------


def option(default, help: str, **argparse_kwargs):
    """A Config field that is also a command-line flag with this help text (a list default is copied per Config)."""
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """The data and run settings of every model script; a script's Config subclasses it with the experiment's
    fields, `epochs` and `batch_size` among them. A default of None is derived from the other settings when the
    script checks them: editing a field in the file is the same as passing its flag."""

    dataset: str = option(
        "cifar100",
        "cifar100 (the paper's, with its 4-level hierarchy), cifar10, svhn, fashion-mnist, mnist, oxford-pet, "
        "food101, cub200, or folder: your own images, --data-root/train/<class>/ and --data-root/test/<class>/",
        choices=DATASETS,
    )
    data_root: str = option(
        "dataset", "folder that holds (or receives) the dataset, e.g. cifar-100-python/; for folder: train/ and test/"
    )
    download: bool = option(True, "download the dataset when it is missing (torchvision's download and md5 check)")
    train_fraction: float = option(1.0, "train on this stratified fraction of the training set (same images per seed)")
    image_size: int | None = option(
        None, "input size; default 32 for the small-image datasets (cifar*, svhn, *mnist), 224 for the others", type=int
    )
    backbone: str | None = option(
        None,
        "the trunk of every network: vgg16 (the paper's, written out in the script), or torchvision's network "
        "without its classifier; default: the paper's, vgg16 (MAOAL's --task domains: its authors' resnet18)",
        choices=BACKBONES,
    )
    stem: str | None = option(
        None,
        "the ResNets' first layers: cifar (3x3 stride-1 convolution, no max-pool) or imagenet (torchvision's); "
        "default: cifar at image size 32, imagenet otherwise",
        choices=("cifar", "imagenet"),
    )
    pretrained: bool = option(False, "start from torchvision's ImageNet weights (downloaded on first use; not vgg16)")
    data_path: str = option(
        "auto",
        "device: the dataset held and augmented on the device; loader: a DataLoader; auto: device on CUDA, else loader",
        choices=("auto", "device", "loader"),
    )
    workers: int | None = option(
        None, "DataLoader processes (loader data path); default: the CPUs this process may use, at most 4", type=int
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
        "that differ from the paper's (e.g. maxl-second-order-pri20-aux100-seed0)",
    )
    resume: bool = option(False, "continue the run in <results-dir>/<run-name> from its checkpoint")
    overwrite: bool = option(False, "start over in a run folder that already holds results")
    limit_batches: int = option(0, "only this many batches per pass (0 = all): smoke tests and benchmarks")
    tensorboard: bool = option(False, "also write each epoch's numbers as TensorBoard scalars into the run folder")
    smoke: bool = option(False, "one-minute install check on CPU: synthetic data in a temporary folder, no download")
    # Not a flag: the fields given on the command line, so that a message names a setting as the user set it.
    flags_given: tuple[str, ...] = field(default=(), repr=False, metadata={"internal": True})

    def __post_init__(self):
        if self.backbone is None:
            self.backbone = self.paper_backbone

    @property
    def paper_backbone(self) -> str:
        """The network of the paper this configuration reproduces (VGG-16); run names write another one."""
        return "vgg16"


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


def setting(cfg: RunConfig, name: str, value=None, with_value: bool = True) -> str:
    """A setting named as the user set it: its flag (`--psi 2,3`) if given on the command line, else its field in
    the script's Config (`psi = [2, 3] in Config`), or, where Config leaves it None, its name and value."""
    value = getattr(cfg, name) if value is None else value
    if name in cfg.flags_given:
        return flag(name, value if with_value else None)
    if next(f for f in dataclasses.fields(cfg) if f.name == name).default is None:  # derived, or set in code
        return f"{name} {value!r}" if with_value else name
    return f"{name} = {value!r} in Config" if with_value else f"{name} in Config"


def fields(config: type) -> list[dataclasses.Field]:
    """Config's settings but flags_given: the experiment's first, as the script lists them, then the shared ones."""
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    own = [f for f in dataclasses.fields(config) if not f.metadata.get("internal")]
    return [f for f in own if f.name not in shared] + [f for f in own if f.name in shared]


def settings(cfg: RunConfig) -> dict:
    """The settings of a config by name, as metrics.json and checkpoints record them."""
    return {f.name: getattr(cfg, f.name) for f in fields(type(cfg))}


def command_line(config: type, description: str) -> OneLineParser:
    """One flag per Config field, in three groups; a flag not given keeps the field's value in the script."""
    parser = OneLineParser(
        description=description.split("\n\n")[0],
        allow_abbrev=False,  # a typo of one flag must not silently mean another
        argument_default=argparse.SUPPRESS,
    )
    defaults, shared = config(), {f.name for f in dataclasses.fields(RunConfig)}
    groups = {name: parser.add_argument_group(name) for name in ("the experiment", "data and network", "run")}
    for f in fields(config):
        value, kwargs = getattr(defaults, f.name), dict(f.metadata)
        if "default" not in kwargs["help"] and value not in (None, ""):
            kwargs["help"] += f" (default: {value})"
        section = "data and network" if f.name in DATA_SETTINGS else "run" if f.name in shared else "the experiment"
        group = groups[section]
        if f.type == "bool":
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(flag(f.name), **{"type": {"int": int, "float": float, "str": str}.get(f.type), **kwargs})
    return parser


def parse_flags(config: type, argv: list[str] | None, description: str = "") -> RunConfig:
    """The Config these flags make; a bad flag is one line and exit code 2, a number that is not finite a UsageError."""
    given = vars(command_line(config, description).parse_args(argv))
    cfg = config(**given, flags_given=tuple(given))
    for name, value in settings(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{setting(cfg, name, with_value=False)} must be a finite number (got {value})")
    return cfg


def require(cfg: RunConfig, at_least_1=(), at_least_0=(), positive=(), fraction=()) -> None:
    """Refuse, with one line naming the setting, a value outside its range (`fraction`: momentums, in [0, 1))."""
    for names, ok, rule in (
        (at_least_1, lambda v: v >= 1, "must be at least 1"),
        (at_least_0, lambda v: v >= 0, "must be 0 or more"),
        (positive, lambda v: v > 0 and math.isfinite(v), "must be positive and finite"),
        (fraction, lambda v: 0 <= v < 1, "must be 0 or more and below 1"),
    ):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise UsageError(f"{setting(cfg, name, with_value=False)} {rule} (got {getattr(cfg, name)})")


def only_with(cfg: RunConfig, where: str, applies: bool, defaults: RunConfig, *names: str) -> None:
    """Refuse a setting of `names` that means something `where` only (another task or mode) when this run is not
    there (`applies` false): given as a flag, or set to another value than its default in `defaults` (a Config of
    this task; a default of None is derived, so only its flag counts)."""
    for name in () if applies else names:
        default = getattr(defaults, name)
        if name in cfg.flags_given or (default is not None and getattr(cfg, name) != default):
            undo = f"drop {flag(name)}" if name in cfg.flags_given else f"leave it at {default!r}"
            raise UsageError(f"{setting(cfg, name)} is used with {where} only, which this run is not: {undo}")


def default_stem(image_size: int) -> str:
    """--stem when not given: the CIFAR stem keeps a 32x32 image's detail; larger images take ImageNet's."""
    return "cifar" if image_size == 32 else "imagenet"


def check_data(
    cfg: RunConfig, method: str, backbones=BACKBONES, backbones_because: str = "", cifar100_only: str = ""
) -> RunConfig:
    """Refuse a dataset or network `method` (or the data) cannot take; return the config with the defaults that
    depend on them resolved: the primary task's classes (primary_level), the image size, the ResNets' stem."""
    if cfg.dataset not in DATASETS:
        raise UsageError(f"{setting(cfg, 'dataset')} is not one of {', '.join(DATASETS)}")
    if cfg.backbone not in backbones:
        raise UsageError(
            f"--backbone {cfg.backbone}: {method} is defined on {', '.join(backbones)} only"
            + (f" ({backbones_because})" if backbones_because else "")
        )
    if cfg.dataset != "cifar100" and cifar100_only:
        raise UsageError(f"--dataset {cfg.dataset}: {method} runs on cifar100 only ({cifar100_only})")
    if not 0 < cfg.train_fraction <= 1:
        raise UsageError(f"--train-fraction must be in (0, 1] (got {cfg.train_fraction})")
    if cfg.dataset == "cifar100":
        primary_level = 20 if cfg.primary_level is None else cfg.primary_level
    else:
        try:
            primary_level = create_dataset.dataset_classes(cfg.dataset, cfg.data_root)
        except DatasetProblem as error:
            raise UsageError(str(error)) from None
        for name in ("primary_level", "aux_level"):
            if getattr(cfg, name, None) is not None and (name, getattr(cfg, name)) != ("primary_level", primary_level):
                undo = f"drop {flag(name)}" if name in cfg.flags_given else f"set {name} = None in Config"
                raise UsageError(
                    f"{setting(cfg, name)} picks a level of CIFAR-100's hierarchy; on {cfg.dataset} the primary task "
                    f"is its {primary_level} classes: {undo}"
                )
    image_size = create_dataset.default_image_size(cfg.dataset) if cfg.image_size is None else cfg.image_size
    if image_size < 32:
        raise UsageError(f"--image-size must be at least 32 (got {image_size})")
    if image_size > MAX_IMAGE_SIZE:
        raise UsageError(
            f"--image-size must be at most {MAX_IMAGE_SIZE} (got {image_size}): the networks' activations, and the "
            "memory they take, grow with the square of the image size"
        )
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
    if cfg.data_path == "device" and not (cfg.dataset in create_dataset.SMALL_IMAGE_DATASETS and image_size == 32):
        raise UsageError(
            f"--data-path device holds 32x32 datasets on the device; {cfg.dataset} at image size {image_size} is read "
            "from its files: use --data-path loader"
        )
    return dataclasses.replace(cfg, primary_level=primary_level, image_size=image_size, stem=stem)


def check_run_settings(cfg: RunConfig) -> None:
    """Refuse run settings (seed, run name, device, ...) that cannot mean what they say."""
    require(cfg, at_least_0=("limit_batches",) + (("workers",) if cfg.workers is not None else ()))
    if cfg.workers is not None and cfg.workers > create_dataset.usable_cpus():
        raise UsageError(
            f"--workers must be at most {create_dataset.usable_cpus()}, the CPUs this process may use (got "
            f"{cfg.workers}): more workers only compete for them, and each holds a copy of a batch in memory"
        )
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


def data_tag(cfg: RunConfig) -> str:
    """The data and network settings of a checked config that differ from the paper's, as a run name writes them
    (e.g. cifar10-resnet18-frac0.1); empty for the paper's."""
    parts = (
        (cfg.dataset != "cifar100", cfg.dataset),
        (cfg.backbone != cfg.paper_backbone, cfg.backbone),
        (cfg.stem not in (None, default_stem(cfg.image_size)), f"{cfg.stem}stem"),
        (cfg.pretrained, "pretrained"),
        (cfg.image_size not in (None, create_dataset.default_image_size(cfg.dataset)), f"size{cfg.image_size}"),
        (cfg.train_fraction != 1, f"frac{cfg.train_fraction:g}"),
    )
    return "-".join(part for differs, part in parts if differs)


def paper_data(cfg: RunConfig) -> bool:
    """Whether a checked config trains on the paper's data and network: all of CIFAR-100, 32x32, its backbone."""
    return not data_tag(cfg)


def edited_settings(cfg: RunConfig, paper: dict) -> dict:
    """The settings that change the result and differ from the paper's values (`paper`, the script's fixed record)."""
    paper = {**paper, "amp": False}
    return {name: getattr(cfg, name) for name in sorted(paper) if getattr(cfg, name) != paper[name]}


def run_name(cfg: RunConfig, stem: str, paper: dict) -> str:
    """The default run name: the script's `stem` (method, levels, seed); what differs from the paper's data and
    network; a short hash of the settings that differ from `paper`, if any; -limitN for a run of --limit-batches N.
    The same settings give the same name again (so --resume finds the run)."""
    name = stem + (f"-{data_tag(cfg)}" if data_tag(cfg) else "")
    edited = edited_settings(cfg, paper)
    if edited:
        name += "-" + hashlib.sha256(json.dumps(edited, sort_keys=True).encode()).hexdigest()[:8]
    return name + (f"-limit{cfg.limit_batches}" if cfg.limit_batches else "")


def not_comparable(cfg: RunConfig, paper: dict, epochs_completed: int) -> list[str]:
    """Why this run's accuracy cannot be set beside the published figures (empty: it can)."""
    reasons = [flag(name, value) for name, value in edited_settings(cfg, paper).items()]
    if cfg.limit_batches:
        reasons.append(flag("limit_batches", cfg.limit_batches))
    if create_dataset.is_synthetic(cfg.dataset, cfg.data_root):
        reasons.append("synthetic data")
    if epochs_completed != PAPER_EPOCHS:
        reasons.append(f"{epochs_completed} of the paper's {PAPER_EPOCHS} epochs")
    return reasons


# --- Devices, seeds, backbones -----------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
        )
    if name.startswith("cuda") and int(name.partition(":")[2] or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--device {name}: this machine has {count} CUDA device(s), numbered from 0")
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
    weights = torchvision.models.get_model_weights(cfg.backbone).DEFAULT if cfg.pretrained else None
    try:
        if cfg.backbone == "vit_b_16":
            network = torchvision.models.vit_b_16(image_size=cfg.image_size)
            if cfg.pretrained:
                state = torchvision.models.vit_b_16(weights=weights).state_dict()
                network.load_state_dict(interpolate_embeddings(cfg.image_size, 16, state))
            return headless(network)
        network = getattr(torchvision.models, cfg.backbone)(weights=weights)
    except (URLError, OSError) as error:  # no internet, no cached weights
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise UsageError(
            f"--pretrained: torchvision's ImageNet weights for {cfg.backbone} are not in '{cache}' and could not be "
            f"downloaded ({getattr(error, 'reason', None) or error}); put {weights.url.rsplit('/', 1)[-1]} there "
            f"by hand (download {weights.url} on a machine with internet; TORCH_HOME moves the cache)"
        ) from None
    if cfg.stem == "cifar":
        network.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        network.maxpool = nn.Identity()
    return headless(network)


# --- Steps: batches, progress, mixed precision, CUDA graphs, meters ----------------------------------------------


def batches(loader, cfg: RunConfig, device: torch.device, phase: str | None = "train"):
    """(step, images, labels) of the loader's batches on `device`, at most --limit-batches of them; `phase`
    names the pass on the progress line (None: a pass the line does not show)."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    steps = min(len(loader), cfg.limit_batches or len(loader))
    # The loader's workers start here (a fork per worker, every pass): with the interrupts blocked until each worker
    # ignores them (create_dataset.ignore_interrupts), so a Ctrl-C to the process group reaches the run alone.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, create_dataset.INTERRUPTS)
    try:
        iterator = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    for step, (images, labels) in enumerate(iterator):
        if step == steps:
            return
        if phase is not None:
            progress.update(phase, step, steps, len(images))
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        yield step, images, labels.to(device, non_blocking=True)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


class Progress:
    """One line on a terminal, redrawn at most once a second: the phase, step of steps, images per second,
    the time left in the epoch and in the run. Silent when stderr is not a terminal (a log file, a pipe)."""

    def __init__(self):
        self.start(None, 0)

    def start(self, stream, epochs: int) -> None:
        """Draw on `stream` (if it is a terminal) for a run of `epochs`; None: draw nothing."""
        self.stream, self.enabled = stream, stream is not None and stream.isatty()
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
        epoch_left = max(elapsed / step * (steps - step), (self.last_epoch_seconds or 0) - (now - self.epoch_started))
        run_left = "?"  # until an epoch has ended
        if self.last_epoch_seconds is not None:
            run_left = duration(epoch_left + (self.epochs - self.epoch) * self.last_epoch_seconds)
        self.draw(
            f"epoch {self.epoch}/{self.epochs} {phase}: step {step + 1}/{steps}, {done / elapsed:.0f} img/s, "
            f"epoch left {duration(epoch_left)}, run left {run_left}"
        )

    def clear(self) -> None:
        if self.enabled and self.drawn:
            self.draw("")
            self.drawn = 0.0

    def draw(self, line: str) -> None:
        with contextlib.suppress(OSError):  # a terminal that went away (SIGHUP)
            self.stream.write(f"\r\033[K{line}")
            self.stream.flush()


progress = Progress()  # a Run draws it for its epochs; off outside a run


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 autocast on CUDA with --amp; a no-op otherwise."""
    if cfg.amp and device.type == "cuda":
        # No weight-cast cache: CUDA graph capture needs every cast inside the captured step.
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


class StepGraphs:
    """Replays each step function as a CUDA graph: one launch per batch instead of hundreds of kernels (at batch size
    100 the GPU finishes VGG-16's kernels faster than Python can launch them), with the same arithmetic.

    A step (images, labels -> tensors) runs eagerly for its first WARMUP calls at each input shape (cuDNN autotuning,
    lazy initialisation), is then captured once and replayed on the batch copied into the graph's own inputs. The
    learning rates a step reads are baked into its capture: every graph is dropped when one of `optimizers` changes
    its learning rate. Parameters must be updated in place (torch.optim and load_state_dict do); the returned tensors
    are overwritten by the next replay of the same step. Off CUDA and with --no-cuda-graphs every call is eager."""

    WARMUP = 3

    def __init__(self, optimizers: list[torch.optim.Optimizer], device: torch.device, enabled: bool = True):
        self.enabled, self.device, self.optimizers = enabled and device.type == "cuda", device, list(optimizers)
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


# --- Files: atomic writes, metrics.json, checkpoints -------------------------------------------------------------


def write_atomic(path: Path, write) -> None:
    """write(tmp_path), flushed to disk, then renamed over `path`: a reader never sees a half-written file, and a
    crash, a signal or power loss leaves the old file or the new one."""
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
    """Strict JSON: every number is finite (a run checks them), so any JSON parser reads it."""
    return json.dumps(obj, indent=1, allow_nan=False) + "\n"


def read_metrics(path: Path) -> dict:
    """A run's metrics.json, with every epoch's test_primary_acc a finite fraction. FileNotFoundError when there is
    none; ValueError saying what is wrong (truncated, not JSON, an accuracy that is not a finite fraction) when it
    cannot be used: `record.get("config")` of a file damaged in its numbers is still on the error as `.config`."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise ValueError("not text") from None
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"unreadable ({error.strerror or error})") from None
    try:
        record = json.loads(text)  # Python reads a hand-written Infinity or NaN too: checked below
    except json.JSONDecodeError as error:
        if not text.strip():
            raise ValueError("empty") from None
        if error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string"):
            raise ValueError(f"truncated (the JSON stops at line {error.lineno})") from None
        raise ValueError(f"not JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    epochs = record.get("epochs") if isinstance(record, dict) else None
    problem = "it holds no list of epochs" if not isinstance(epochs, list) else "" if epochs else "it records no epoch"
    for number, entry in enumerate(epochs if isinstance(epochs, list) else [], 1):
        value = entry.get("test_primary_acc") if isinstance(entry, dict) else None
        shown = f"epoch {number}'s test_primary_acc is {json.dumps(value)[:40]}"  # as the file spells it: Infinity
        if value is None:
            problem = f"epoch {number} has no test_primary_acc"
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            problem = f"{shown}, not a number"
        elif not math.isfinite(value):
            problem = f"{shown}, not a finite number"
        elif not 0 <= value <= 1:
            problem = f"{shown}, not a fraction between 0 and 1"
        if problem:
            break
    if problem:
        error = ValueError(problem)
        config = record.get("config") if isinstance(record, dict) else None
        error.config = config if isinstance(config, dict) else None  # it still finds the run
        raise error
    return record


def same_setting(saved, current) -> bool:
    """A recorded setting equals the current one; older checkpoints wrote a comma list (psi) as its text."""
    if isinstance(saved, str) and isinstance(current, list):
        with contextlib.suppress(ValueError):
            values = [int(v) for v in saved.split(",")]
            return (values * len(current) if len(values) == 1 else values) == current
    return saved == current


def load_checkpoint(path: Path, method: str, cfg: RunConfig) -> dict:
    """The checkpoint at `path`, after checking it belongs to this configuration; refuses with one line. A setting
    it does not record (older than the setting) counts as the script's default."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        recorded, _ = checkpoint["config"], checkpoint["next_epoch"]
    except Exception as error:
        raise UsageError(
            f"--resume: '{path}' is unreadable (truncated or corrupt: {type(error).__name__}); "
            f"start a new run with another --run-name, or --overwrite to replace it"
        ) from None
    if recorded.get("method") != method:
        raise UsageError(f"--resume: '{path}' is a {recorded.get('method')} run, not {method}; use another --run-name")
    saved, current = {**settings(type(cfg)()), **recorded}, settings(cfg)
    differ = [k for k in current if k not in RESUMABLE_CHANGES and not same_setting(saved[k], current[k])]
    if differ:
        was = " ".join(flag(k, saved[k]) for k in differ)
        has = " ".join(flag(k, current[k]) for k in differ)
        raise UsageError(
            f"--resume: '{path}' was written with {was} but this run has {has}; "
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


# --- The run folder: created, locked, cleaned --------------------------------------------------------------------


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
    if record is not None and record[1] in (None, socket.gethostname()):
        with contextlib.suppress(OSError):
            os.kill(record[0], 0)
            return record[0]
    return None


def holder(run_dir: Path, unknown=None) -> str:
    """The process in `run_dir`'s lock file, 'pid N', or 'pid N on HOST' for one on another host."""
    pid, host = lock_record(run_dir) or (unknown, None)
    return f"pid {pid}" + (f" on {host}" if host not in (None, socket.gethostname()) else "")


def locked_by(run_dir: Path) -> str | None:
    """Who holds `run_dir`'s lock now, 'pid N' or 'pid N on HOST', by trying the lock itself (a holder on another
    host too, where the file system carries flock); None when nobody does."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return holder(run_dir, unknown="?")
    finally:
        os.close(fd)


class RunFolder:
    """The run's folder, held by this process alone while the run lasts (docs/reliability.md, "The run folder").

    Entering creates it (and any missing parents), checks it is writable, takes a kernel lock (flock) on its
    LOCK_FILE, which dies with its holder however it dies, and removes the temporary files a killed run left.
    Leaving releases the lock and removes the folders entering created if the run wrote nothing into them."""

    def __init__(self, path: Path):
        self.path, self.created, self.lock_fd = path, [], None

    def __enter__(self) -> Path:
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.created = missing
            tempfile.TemporaryFile(dir=self.path).close()
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
                raise UsageError(
                    f"'{self.path}' is in use by another run ({holder(self.path)}); wait for it to end, "
                    f"or choose another --run-name"
                ) from None
            # The holder we waited for may have removed the file meanwhile: hold the lock of the file on disk.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
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


# --- Provenance and the log --------------------------------------------------------------------------------------


def command(argv: list[str] | None = None) -> list[str]:
    """The command that started this run: the script as it was invoked and its flags (`argv` where main() was
    handed them), so that the resume line can be pasted where the user is."""
    return ["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def processor_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def provenance(device: torch.device, argv: list[str] | None = None) -> dict:
    """Where, when and with what this start (or resume) of the run runs; `code`: the checkout's commit and whether
    its tracked files were modified (None and None outside a git checkout)."""
    here, commit = Path(__file__).resolve().parent, None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit, status = [
            subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)
            for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"])
        ]
    code = {"commit": None, "modified": None}
    if commit is not None and commit.returncode == status.returncode == 0:
        code = {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}
    return {
        "code": code,
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


def print_lost(line: str, stream=None) -> None:
    """Print, where a terminal that went away (a hang-up) loses the line, not the run."""
    with contextlib.suppress(OSError):
        print(line, file=stream or sys.stdout, flush=True)


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
        print_lost(line, stream)
        self.write(line)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()


def summary_line(summary: dict) -> str:
    published = "; ".join(f"{v:.1f}% ({k})" for k, v in summary["published_test_primary_acc"].items())
    if not published:
        because = summary.get("unpublished_because")
        beside = "published: none for this configuration" + (f" ({because})" if because else "")
    elif summary["comparable_with_published"]:
        beside = f"published: {published}"
    else:
        beside = f"not comparable with the published figures ({', '.join(summary['not_comparable_because'])})"
    best = ""
    if "best_epoch" in summary:
        best = (
            f" (best {summary['best_test_primary_acc_chosen_on_test_set']:.2f}% at epoch {summary['best_epoch']}, "
            "chosen on the test set)"
        )
    return (
        f"final test primary accuracy {summary['final_test_primary_acc']:.2f}%, mean of the last "
        f"{plural(min(5, summary['epochs_completed']), 'epoch')} {summary['last5_mean_test_primary_acc']:.2f}%{best} "
        f"| {beside}"
    )


# --- The run -----------------------------------------------------------------------------------------------------


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Run:
    """One run of a model script, the loop's companion: `with experiment.Run(argv) as run:` around main()'s body.
    Leaving the block, a refusal, an interrupt (SIGINT, SIGTERM, SIGHUP) or a full disk is one line and its exit
    code, the lock is released, and a run that saved nothing leaves no folder behind (docs/reliability.md). The
    script calls, in order: parse, open, datasets and loaders, resume, epochs (save each), finish."""

    def __init__(self, argv: list[str] | None = None):
        self.argv, self.cfg, self.dir, self.device = argv, None, None, torch.device("cpu")
        self.checkpoint: dict | None = None  # --resume's
        self.history: list[dict] = []
        self.saved_epochs = self.epoch = self.start_epoch = 0
        self.data: Loaders | None = None
        self.log: RunLog | None = None
        self.scalars, self.untrained_loss = None, None  # the TensorBoard writer; --smoke's untrained test loss
        self.stack = contextlib.ExitStack()  # the run folder's lock, --smoke's temporary folder

    def __enter__(self) -> Run:
        def interrupt(signum, frame):
            raise Interrupted(signum)

        self.previous_handlers = {s: signal.signal(s, interrupt) for s in SIGNALS}
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        progress.clear()
        if isinstance(error, Interrupted):  # further signals while it ends (a closed terminal sends two): ignored
            for s in SIGNALS:
                signal.signal(s, signal.SIG_IGN)
        try:
            if isinstance(error, _Finished):
                return True
            if isinstance(error, (UsageError, DatasetProblem)):
                print(f"error: {error}", file=sys.stderr)
                raise SystemExit(2) from None
            if isinstance(error, (Interrupted, RunFault, NonFiniteLoss)):
                self.stopped(error)
            return False
        finally:
            progress.start(None, 0)
            if self.log is not None:
                self.log.close()
            self.stack.close()
            if not isinstance(error, Interrupted):
                for s, handler in self.previous_handlers.items():
                    signal.signal(s, handler)

    def stopped(self, error: Exception) -> None:
        """The run stopped before its end: say what was kept and how to go on, and exit."""
        kept = f"the checkpoint after epoch {self.saved_epochs} in {self.dir} is kept" if self.saved_epochs else ""
        kept = kept or "nothing was saved"
        again = ""
        if self.cfg:
            args = [a for a in command(self.argv)[2:] if a not in ("--resume", "--overwrite")]
            if "--run-name" not in args and not any(a.startswith("--run-name=") for a in args):
                args += ["--run-name", self.cfg.run_name]
            again = f"Resume with: {shlex.join([*command(self.argv)[:2], *args, '--resume'])}"
        say = self.log.say if self.log else lambda line, stream: print_lost(line, stream)
        if isinstance(error, NonFiniteLoss):
            if self.log:
                self.log.write(f"error: {error}; {kept}. {error.hint}")
            print(f"error: {error}; {kept}. {error.hint}", file=sys.stderr)
            raise SystemExit(2) from None
        if isinstance(error, RunFault):
            say(f"error: {error}; {kept}" + (f". {again}" if self.saved_epochs else ""), stream=sys.stderr)
            raise SystemExit(1) from None
        epoch = self.epoch
        if self.saved_epochs:
            where = f"after epoch {epoch} was saved" if self.saved_epochs == epoch else f"in epoch {epoch}"
            line = f"interrupted {where}; the checkpoint after epoch {self.saved_epochs} is in {self.dir}. {again}"
        else:
            line = f"interrupted{f' in epoch {epoch}' if epoch else ''}; no epoch was completed and nothing was saved"
        say("\n" + line, stream=sys.stderr)
        raise SystemExit(128 + error.signum) from None

    # -- before the loop

    def parse(self, config: type, description: str) -> RunConfig:
        """The command line (main()'s argv, else the process's) as a `config`. With --smoke: synthetic data in a
        temporary folder, 2 batches on CPU (it refuses the flags it sets itself)."""
        cfg = parse_flags(config, self.argv, description)
        if not cfg.smoke:
            return cfg
        fixed = SMOKE_SETS & set(cfg.flags_given)
        if fixed:
            raise UsageError(
                f"--smoke sets {' '.join(flag(name) for name in sorted(fixed))} itself (2 batches on CPU, synthetic "
                "data in a temporary folder); drop them"
            )
        # 1,000 training images (50 a class) leave room for a method's held-out developing set at its default size.
        tmp = Path(self.stack.enter_context(tempfile.TemporaryDirectory(prefix="smoke-")))
        if cfg.dataset in DATASETS:
            create_dataset.make_synthetic(cfg.dataset, tmp / "data", n_train=1000, n_test=100, seed=cfg.seed)
        return dataclasses.replace(cfg, data_root=str(tmp / "data"), results_dir=str(tmp / "results"), **SMOKE_SETTINGS)

    def open(
        self,
        method: str,
        cfg: RunConfig,
        stem: str,
        paper: dict,
        derived: dict | None = None,
        published: dict | None = None,
        unpublished_because: str = "",
    ) -> None:
        """Take the run folder: `cfg` checked by the script, named by `stem` and `paper` (the paper's values of the
        settings that change the result) unless --run-name; with --resume, its checkpoint read and checked. Then
        its lock, the log, the seeds. `derived` values are recorded beside the settings; `published` (source: %)
        and `unpublished_because` go into the summary. A --resume of a finished run prints its summary and leaves
        the `with Run` block here."""
        check_run_settings(cfg)
        named = bool(cfg.run_name)
        self.cfg = cfg = dataclasses.replace(cfg, run_name=cfg.run_name or run_name(cfg, stem, paper))
        self.method, self.paper = method, paper
        self.published, self.unpublished_because = published or {}, unpublished_because
        self.device = resolve_device(cfg.device)
        self.dir = Path(cfg.results_dir) / cfg.run_name
        if cfg.resume:
            if not (self.dir / "checkpoint.pt").is_file():
                raise self.missing_checkpoint(named)
            self.checkpoint = load_checkpoint(self.dir / "checkpoint.pt", method, cfg)
            if self.checkpoint["next_epoch"] >= cfg.epochs:
                self.finished()
        versions = {"method": method, "resolved_device": str(self.device), "torch": str(torch.__version__)}
        self.record_config = {**settings(cfg), **(derived or {}), **versions}
        self.sessions = [*(self.checkpoint or {}).get("provenance", []), provenance(self.device, self.argv)]
        self.log = RunLog(self.dir / "log.txt", self.sessions[-1], f"{method}: {self.dir}")  # written once saved
        self.stack.enter_context(RunFolder(self.dir))
        # Refuse to lose results, or to write into a folder that holds files no run of this project made.
        foreign = sorted(path.name for path in self.dir.iterdir() if not RUN_FILES.fullmatch(path.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UsageError(
                f"'{self.dir}' holds files no run of this project wrote ({shown}); choose another --run-name or "
                f"--results-dir"
            )
        results = (self.dir / "metrics.json").exists() or (self.dir / "checkpoint.pt").exists()
        if results and not (cfg.resume or cfg.overwrite):
            raise UsageError(
                f"'{self.dir}' already holds results; use --resume to continue that run, "
                f"another --run-name, or --overwrite to replace it"
            )
        configure_backends(cfg, self.device)

    def missing_checkpoint(self, named: bool) -> UsageError:
        """--resume without a checkpoint: where it looked, and, for a default name, what made the name and which
        runs of this method the results folder holds."""
        message = f"--resume: no checkpoint at '{self.dir / 'checkpoint.pt'}'"
        if not named:
            edited = " ".join(flag(name, value) for name, value in edited_settings(self.cfg, self.paper).items())
            because = f"these settings differ from the paper's: {edited}" if edited else "the paper's settings"
            runs = sorted(p.parent.name for p in Path(self.cfg.results_dir).glob(f"{self.method}-*/checkpoint.pt"))
            here = f"; {self.method} runs in '{self.cfg.results_dir}': {', '.join(runs[:5])}" if runs else ""
            message += f" (the default name of this configuration, {because}){here}"
        return UsageError(f"{message}; start without --resume, or check --results-dir and --run-name")

    def finished(self) -> None:
        """A --resume of a finished run: its summary, and metrics.json made again if damaged or lost."""
        checkpoint = self.checkpoint
        then = (
            "train longer in a new run"
            if cosine_epochs(checkpoint) is not None
            else "pass a larger --epochs to extend it"
        )
        print(f"'{self.dir}' already finished {plural(checkpoint['next_epoch'], 'epoch')}; {then}")
        summary = self.summary(checkpoint["epochs"])
        try:
            matches = read_metrics(self.dir / "metrics.json")["epochs"] == checkpoint["epochs"]
        except (OSError, ValueError):
            matches = False
        if not matches:
            metrics = {key: checkpoint.get(key, []) for key in ("config", "provenance", "epochs")}
            text = json_text({**metrics, "summary": summary})
            with RunFolder(self.dir):
                write_atomic(self.dir / "metrics.json", lambda tmp: Path(tmp).write_text(text))
            print("rewrote its damaged metrics.json from the checkpoint")
        print(summary_line(summary))
        raise _Finished

    def datasets(self):
        """(train set with its augmentation, test set) of --dataset; --train-fraction of the training images."""
        return create_dataset.load_datasets(self.cfg)

    def loaders(self, train_set, test_set, dev_set=None, auxiliary_sets=()) -> Loaders:
        """The run's batches: train and test, a developing set held out of training, auxiliary training sets."""
        self.data = create_dataset.make_loaders(self.cfg, self.device, train_set, test_set, dev_set, auxiliary_sets)
        return self.data

    def resume(self, saved: dict) -> None:
        """With --resume, load the checkpoint into `saved` (name -> an object with load_state_dict: the networks,
        optimisers and schedulers checkpoint.pt holds) and the RNGs; then say what the run does."""
        if self.checkpoint is not None:
            path, checkpoint = self.dir / "checkpoint.pt", self.checkpoint
            missing = [key for key in (*saved, "rng", "epochs") if key not in checkpoint]
            if missing:
                raise UsageError(
                    f"--resume: '{path}' is incomplete (no {', '.join(missing)}); "
                    f"start a new run with another --run-name, or --overwrite to replace it"
                )
            try:
                for key, obj in saved.items():
                    obj.load_state_dict(checkpoint[key])
                set_rng_state(checkpoint["rng"], self.data)
            except (RuntimeError, KeyError, ValueError, TypeError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise UsageError(
                    f"--resume: '{path}' does not fit this run ({reason}); use another --run-name"
                ) from None
            self.history, self.start_epoch = checkpoint["epochs"], checkpoint["next_epoch"]
            self.saved_epochs = self.start_epoch
            self.log.open()
            self.log.say(f"resuming {self.dir} at epoch {self.start_epoch + 1}")
        self.epoch = self.start_epoch + 1
        self.log.say(f"{self.method}: {self.dir} on {self.device}, {plural(self.cfg.epochs, 'epoch')}")
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # an optional extra: checked by check_run_settings

            self.scalars = SummaryWriter(log_dir=str(self.dir))
        progress.start(sys.stderr, self.cfg.epochs)

    def smoke_baseline(self, metrics: dict) -> None:
        """--smoke: the untrained network's test metrics; finish() fails if training blows its loss up."""
        self.untrained_loss = metrics["test_primary_loss"]

    # -- the loop

    def epochs(self):
        """The epochs still to train, one by one (from the checkpoint's next with --resume)."""
        for epoch in range(self.start_epoch + 1, self.cfg.epochs + 1):
            self.epoch, self.epoch_started = epoch, time.perf_counter()
            progress.start_epoch(epoch)
            yield epoch

    def save(self, saved: dict, metrics: dict) -> dict:
        """The epoch's record (its metrics, checked finite, and seconds): checkpoint.pt (the state of `saved`, the
        RNGs, the record so far), then metrics.json, each atomically, the signals held meanwhile so that the two
        always hold the same epochs; a failed write (a full disk) is a RunFault. Returns the record."""
        bad = [name for name, value in metrics.items() if not math.isfinite(value)]
        if bad:
            raise NonFiniteLoss(f"non-finite {', '.join(bad)} at epoch {self.epoch}; the run stopped")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record = {"epoch": self.epoch, **metrics, "seconds": time.perf_counter() - self.epoch_started}
        self.history.append(record)
        progress.end_epoch()
        self.sessions[-1]["ended"] = now()
        checkpoint = {key: obj.state_dict() for key, obj in saved.items()}
        checkpoint.update(config=self.record_config, epochs=self.history, next_epoch=self.epoch)
        checkpoint.update(rng=rng_state(self.data), provenance=self.sessions)
        summary = self.summary(self.history)
        files = {"config": self.record_config, "provenance": self.sessions, "epochs": self.history, "summary": summary}
        received = []  # the signals held meanwhile, delivered afterwards
        handlers = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in SIGNALS}
        try:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)  # in memory first: a full disk then fails with the OSError that says so
            for name, data in (("checkpoint.pt", buffer.getbuffer()), ("metrics.json", json_text(files).encode())):
                try:
                    write_atomic(self.dir / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
                except OSError as error:
                    raise RunFault(f"could not write {name} in {self.dir} ({error.strerror or error})") from None
            self.saved_epochs = self.epoch
            self.log.open()
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if received:
            raise Interrupted(received[0])
        if self.scalars is not None:
            for name, value in record.items():
                self.scalars.add_scalar(name, value, self.epoch)
            self.scalars.flush()
        return record

    def say(self, line: str) -> None:
        """Print a line and write it to the run's log.txt."""
        self.log.say(line)

    def summary(self, history: list[dict]) -> dict:
        """Final-epoch test accuracy and the mean over the last 5 epochs (the paper's way), in %; the published
        figures for this configuration, and whether this run is one they can be compared with."""
        accs = [100 * r["test_primary_acc"] for r in history]
        reasons = not_comparable(self.cfg, self.paper, len(history))
        best = max(range(len(accs)), key=accs.__getitem__)
        unpublished_because = ""
        if not self.published:
            unpublished_because = self.unpublished_because
            if not paper_data(self.cfg):
                unpublished_because = f"the papers report no figure for this data and network ({data_tag(self.cfg)})"
        return {
            "epochs_completed": len(history),
            "final_test_primary_acc": accs[-1],
            "last5_mean_test_primary_acc": sum(accs[-5:]) / len(accs[-5:]),
            # What the MAOAL authors report: the best epoch, chosen on the test set (optimistic; not this project's).
            "best_test_primary_acc_chosen_on_test_set": accs[best],
            "best_epoch": history[best]["epoch"],
            "published_test_primary_acc": self.published,
            "unpublished_because": unpublished_because,
            "comparable_with_published": not reasons,
            "not_comparable_because": reasons,
        }

    def finish(self) -> dict:
        """The summary line; with --smoke, the check that training did not diverge. Returns the summary."""
        summary = self.summary(self.history)
        self.say(summary_line(summary))
        if self.cfg.smoke:
            after = self.history[-1]["test_primary_loss"]
            if not after <= SMOKE_TOLERANCE * self.untrained_loss:
                raise UsageError(
                    f"smoke test failed: the test loss went from {self.untrained_loss:.4g} (untrained) to {after:.4g}; "
                    "training diverged (check the flags given with --smoke)"
                )
            print("smoke test passed: the install trains and evaluates")
        return summary
