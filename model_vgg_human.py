"""Human baseline: VGG-16 with a human-designed auxiliary task on CIFAR-100 (MAXL paper, Liu et al. 2019).

A multi-task VGG-16 learns the primary task (default: the 20 CIFAR-100 superclasses) together
with an auxiliary task whose labels are the human-made finer classes of the hierarchy (default:
the 100 fine classes). The "Human" curve of the MAXL paper's Figure 3.

    python model_vgg_human.py                                  # primary 20, auxiliary 100, 200 epochs
    python model_vgg_human.py --primary-level 3 --aux-level 10
    python model_vgg_human.py --smoke                          # one-minute install check on CPU

To change the experiment, edit `Config` below or pass the flag: every field is one, and the two are the same.
main(), at the bottom, holds the run loop; it calls experiment.py for the run machinery (flags, the run folder,
checkpoints, resume). Prints one line per epoch (train and test loss and accuracy, primary and auxiliary) and
writes results/<run-name>/metrics.json and checkpoint.pt after every epoch; --resume continues.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import experiment
from create_dataset import LEVELS, level_index
from experiment import (
    FiniteGuard,
    Meter,
    RunConfig,
    StepGraphs,
    UsageError,
    autocast,
    batches,
    make_backbone,
    option,
    paper_data,
    require,
    setting,
)

CIFAR100_ONLY = "its auxiliary task is the finer level of CIFAR-100's hierarchy, --aux-level"


@dataclass
class Config(RunConfig):
    """The experiment: the paper's settings (edit here or pass the flag). The data and run settings are
    RunConfig's, in experiment.py."""

    primary_level: int | None = option(
        None,
        "primary task on CIFAR-100: number of classes in the hierarchy; default: 20, the superclasses (other "
        "datasets: their classes)",
        choices=(3, 10, 20),
        type=int,
    )
    aux_level: int = option(100, "auxiliary task: a finer level of the hierarchy", choices=(10, 20, 100))
    epochs: int = option(200, "training epochs")
    batch_size: int = option(100, "images per batch, train and test")
    lr: float = option(0.01, "SGD learning rate, no momentum, no weight decay")
    lr_step: int = option(50, "the learning rate is multiplied by --lr-gamma every this many epochs")
    lr_gamma: float = option(0.5, "StepLR factor")
    focal_gamma: float = option(2.0, "focal loss exponent (paper: 2)")
    aux_weight: float = option(1.0, "weight of the auxiliary loss in the training step (the paper: 1)")


# ---------------------------------------------------------------------------------------------
# Precision


# Copied from model_vgg_single.py
def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (autocast) -> float32 for losses; float32 and float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# Networks


# Copied from model_vgg_single.py
def conv_block(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """num_convs x (3x3 conv, BatchNorm, ReLU), then 2x2 max-pool; conv i at index 3 * i."""
    layers = []
    for i in range(num_convs):
        layers += [
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers, nn.MaxPool2d(kernel_size=2, stride=2))


# Copied from model_vgg_single.py
def head(num_classes: int, num_features: int = 512) -> nn.Sequential:
    return nn.Sequential(nn.Linear(num_features, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes))


# Copied from model_vgg_single.py
def init_weights(module: nn.Module, weight_init) -> None:
    """The paper's initialisation of the VGG-16 blocks and the heads; a torchvision backbone keeps its own (or its
    ImageNet weights)."""
    for name, m in module.named_modules():
        if name.startswith("backbone"):
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weight_init(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# Copied from model_vgg_single.py
class Trunk(nn.Module):
    """The features every head shares: VGG-16's 13 conv layers in five blocks (64, 128, 256, 512, 512 channels:
    32x32 -> 512 features), or a headless torchvision `backbone` (make_backbone)."""

    def __init__(self, backbone: nn.Module | None = None):
        super().__init__()
        if backbone is None:
            self.block1 = conv_block(3, 64, 2)
            self.block2 = conv_block(64, 128, 2)
            self.block3 = conv_block(128, 256, 3)
            self.block4 = conv_block(256, 512, 3)
            self.block5 = conv_block(512, 512, 3)
        self.backbone = backbone
        self.num_features = 512 if backbone is None else backbone.num_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            return self.backbone(x)
        for block in (self.block1, self.block2, self.block3, self.block4, self.block5):
            x = block(x)
        if x.shape[-1] > 1:  # inputs larger than 32x32: the last feature map averaged, as torchvision's VGG pools
            x = F.adaptive_avg_pool2d(x, 1)
        return x.flatten(1)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk's parameters (those every head shares)."""
        return [p for name, p in self.named_parameters() if name.startswith(("block", "backbone."))]


class VGG16(Trunk):
    """Multi-task VGG-16: primary head `classifier1`, auxiliary head `classifier2`. Returns logits."""

    def __init__(self, num_primary: int, num_auxiliary: int, backbone: nn.Module | None = None):
        super().__init__(backbone)
        self.classifier1 = head(num_primary, self.num_features)
        self.classifier2 = head(num_auxiliary, self.num_features)
        init_weights(self, nn.init.xavier_uniform_)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.classifier1(features), self.classifier2(features)


# ---------------------------------------------------------------------------------------------
# Losses


# Copied from model_vgg_single.py
def focal_terms(logits: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-sample, per-class focal terms -(1 - p)^gamma log p, with p = softmax(logits), in float32 or wider."""
    log_p = F.log_softmax(at_least_float32(logits), dim=1)
    return -(1 - log_p.exp()).pow(gamma) * log_p


# Copied from model_vgg_single.py
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss against a target distribution (one-hot or soft), averaged over the batch."""
    return (target * focal_terms(logits, gamma)).sum(1).mean()


# ---------------------------------------------------------------------------------------------
# Training and evaluation steps


def train_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict:
    """One batch: an SGD step on the primary plus --aux-weight times the human auxiliary focal loss; metrics."""
    optimizer = state["optimizer"]
    primary, auxiliary = labels[:, level_index(cfg.primary_level)], labels[:, level_index(cfg.aux_level)]
    with autocast(cfg, images.device):
        primary_logits, aux_logits = state["forward_model"](images)
    primary_loss = focal_loss(primary_logits, F.one_hot(primary, cfg.primary_level).float(), cfg.focal_gamma)
    aux_loss = focal_loss(aux_logits, F.one_hot(auxiliary, cfg.aux_level).float(), cfg.focal_gamma)
    out = {
        "loss": primary_loss + cfg.aux_weight * aux_loss,
        "train_primary_loss": primary_loss,
        "train_primary_acc": (primary_logits.argmax(1) == primary).float().mean(),
        "train_aux_loss": aux_loss,
        "train_aux_acc": (aux_logits.argmax(1) == auxiliary).float().mean(),
    }
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return out


# Copied from model_vgg_single.py
def train_epoch(state: dict, graphs: StepGraphs, loader, cfg: Config, device: torch.device, epoch: int) -> dict:
    """One pass over the train set."""
    meter = Meter()
    guard = FiniteGuard(device)
    state["model"].train()
    train = functools.partial(train_step, state, cfg=cfg)
    for step, images, labels in batches(loader, cfg, device):
        out = graphs("train", train, images, labels)
        guard.watch(out.pop("loss"), epoch, "train", step)
        for name, value in out.items():
            meter.add(name, value, images.shape[0])
    guard.check(epoch, "train")
    return meter.means()


def eval_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict:
    """Test metrics of one batch, as tensors."""
    primary, auxiliary = labels[:, level_index(cfg.primary_level)], labels[:, level_index(cfg.aux_level)]
    with autocast(cfg, images.device):
        primary_logits, aux_logits = state["forward_model"](images)
    return {
        "test_primary_loss": focal_loss(primary_logits, F.one_hot(primary, cfg.primary_level).float(), cfg.focal_gamma),
        "test_primary_acc": (primary_logits.argmax(1) == primary).float().mean(),
        "test_aux_loss": focal_loss(aux_logits, F.one_hot(auxiliary, cfg.aux_level).float(), cfg.focal_gamma),
        "test_aux_acc": (aux_logits.argmax(1) == auxiliary).float().mean(),
    }


# Copied from model_vgg_single.py
@torch.inference_mode()
def evaluate(state: dict, graphs: StepGraphs, loader, cfg: Config, device: torch.device) -> dict[str, float]:
    """eval_step over the test set, averaged per image; the network back in training mode."""
    meter = Meter()
    state["model"].eval()
    step = functools.partial(eval_step, state, cfg=cfg)
    for _, images, labels in batches(loader, cfg, device, phase="test"):
        for name, value in graphs("evaluate", step, images, labels).items():
            meter.add(name, value, images.shape[0])
    state["model"].train()
    return meter.means()


def build(cfg: Config, device: torch.device) -> dict:
    """The network, its optimiser and scheduler; forward_model is the network as the steps run it (compiled with
    --compile)."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = VGG16(cfg.primary_level, cfg.aux_level, make_backbone(cfg)).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma),
        "forward_model": torch.compile(model) if cfg.compile else model,
    }


def epoch_line(record: dict, epochs: int) -> str:
    r = record
    return (
        f"epoch {r['epoch']:3d}/{epochs} "
        f"| train pri {r['train_primary_loss']:.4f} {100 * r['train_primary_acc']:5.2f}% "
        f"aux {r['train_aux_loss']:.4f} {100 * r['train_aux_acc']:5.2f}% "
        f"| test pri {r['test_primary_loss']:.4f} {100 * r['test_primary_acc']:5.2f}% "
        f"aux {r['test_aux_loss']:.4f} {100 * r['test_aux_acc']:5.2f}% | {r['seconds']:.1f}s"
    )


# ---------------------------------------------------------------------------------------------
# Settings: checks, run names, published figures


def check_config(cfg: Config) -> Config:
    """Refuse impossible settings before anything runs; return the config to run, its derived defaults resolved."""
    cfg = experiment.check_data(cfg, "human", cifar100_only=CIFAR100_ONLY)
    require(
        cfg,
        at_least_1=("epochs", "batch_size", "lr_step"),
        at_least_0=("focal_gamma", "aux_weight"),
        positive=("lr", "lr_gamma"),
    )
    if cfg.aux_level <= cfg.primary_level:
        raise UsageError(
            f"{setting(cfg, 'aux_level')} must be finer than {setting(cfg, 'primary_level')} "
            f"(choose from {', '.join(str(n) for n in LEVELS if n > cfg.primary_level)})"
        )
    return cfg


def run_name_stem(cfg: Config) -> str:
    weight = f"-auxw{cfg.aux_weight:g}" if cfg.aux_weight != 1 else ""
    return f"human-pri{cfg.primary_level}-aux{cfg.aux_level}{weight}-seed{cfg.seed}"


# Copied from model_vgg_single.py
def paper_settings(cfg: Config) -> dict:
    """The paper's values of the settings that change the result and are not in run_name_stem.

    A fixed record, not Config's defaults: a run whose settings differ gets a hash of them in its name."""
    return {"batch_size": 100, "lr": 0.01, "lr_step": 50, "lr_gamma": 0.5, "focal_gamma": 2.0}


def derived_settings(cfg: Config) -> dict:
    """Values computed from the flags, stored beside them in metrics.json."""
    return {"aux_classes": cfg.aux_level}


# Copied from model_vgg_single.py
RL_AUX = "rl-aux notebook, a reproduction: one run, mean of its last 15 of {} epochs"


def published_accuracy(cfg: Config) -> dict[str, float]:
    """Published test accuracy (%) for this configuration, where one exists: the papers' and the rl-aux notebook's."""
    if paper_data(cfg) and cfg.primary_level == 20 and cfg.aux_level == 100 and cfg.aux_weight == 1:
        return {
            "WAMAL authors' README": 75.7,
            "derived from the WAMAL paper's abstract": 74.6,
            RL_AUX.format(200): 75.52,
        }
    return {}


def unpublished_because(cfg: Config) -> str:
    if cfg.aux_weight != 1:
        return "the papers and the rl-aux notebook report Human at --aux-weight 1 only"
    return "the MAXL paper shows the pairs other than 20 -> 100 only as curves of its Figure 3"


# ---------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> None:
    """Parse the flags into Config, open the run, load the data, build, resume; then each epoch train, evaluate,
    step the schedule, save and print; then the summary. A refusal is one line and exit code 2."""
    with experiment.Run(argv) as run:
        cfg = check_config(run.parse(Config, __doc__))
        run.open(
            "human", cfg, run_name_stem(cfg), paper_settings(cfg), derived_settings(cfg),
            published_accuracy(cfg), unpublished_because(cfg),
        )  # fmt: skip
        data = run.loaders(*run.datasets())
        state = build(cfg, run.device)
        saved = {name: state[name] for name in ("model", "optimizer", "scheduler")}  # what checkpoint.pt holds
        run.resume(saved)
        graphs = StepGraphs([state["optimizer"]], run.device, cfg.cuda_graphs)
        if cfg.smoke:
            run.smoke_baseline(evaluate(state, graphs, data.test, cfg, run.device))
        for epoch in run.epochs():
            rates = {"lr": state["optimizer"].param_groups[0]["lr"]}
            metrics = train_epoch(state, graphs, data.train, cfg, run.device, epoch)
            metrics |= evaluate(state, graphs, data.test, cfg, run.device)
            state["scheduler"].step()
            record = run.save(saved, metrics | rates)
            run.say(epoch_line(record, cfg.epochs))
        run.finish()


if __name__ == "__main__":
    main()
