"""MAOAL: module-aware auxiliary weights learned by implicit differentiation (Chen et al., NeurIPS 2022),
on the CIFAR-100 hierarchy with VGG-16, with the authors' baselines.

A multi-task VGG-16 learns the primary task (default: the 20 CIFAR-100 superclasses) with the human-made
finer labels as auxiliary task (default: the 100 fine classes), as Human does; but in each of the trunk's
five convolution blocks b the auxiliary gradient is scaled by its own weight lambda_b. lambda is learned
by bi-level optimisation: every --meta-every steps it takes a step along the implicit-function
hypergradient of the primary loss on a developing set held out of the training set (a truncated Neumann
series, as in AuxiLearn). --mode equal, gcs and single are the authors' baselines on the same images.

    python model_vgg_maoal.py                                  # MAOAL: primary 20, auxiliary 100, 200 epochs
    python model_vgg_maoal.py --mode equal                     # lambda = 1: Human's loss, same training images
    python model_vgg_maoal.py --mode gcs --primary-level 3 --aux-level 10
    python model_vgg_maoal.py --smoke                          # one-minute install check on CPU

To change the experiment, edit `Config` below (or pass the flag: every field is one). The run machinery
(command line, checkpoints, resume) is experiment.py's.
Prints one line per epoch (train and test loss and accuracy, primary and auxiliary; lambda per block; in
maoal mode the developing batches' primary loss and accuracy and the hypergradient's norm) and writes
results/<run-name>/metrics.json and checkpoint.pt after every epoch; --resume continues.
Cost: a maoal or gcs step backpropagates twice (each loss's gradient apart), about 1.7x a Human step; every
--meta-every steps the hypergradient (J = 3) costs about 22 Human steps: an epoch about 2.8x Human's
(measured on CPU at batch 100, benchmarks/README.md; not yet on a GPU).
The authors' Neumann step, alpha = 1, is kept, but on VGG-16 the series diverges: the largest eigenvalue of
dg/dW is of the order of 10^3 (on synthetic data at initialisation, batch 50, the hypergradient's norm grew
from 6e3 at J = 1 to 7e9 at J = 3 and overflowed at J = 6), so the clip to norm 10 sets the step's size and the
series' last term its direction. --neumann-alpha 1e-4 converges there (norms 0.003, 0.006, 0.010 at J = 1, 3, 6).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import experiment
from create_dataset import CIFAR100, LEVELS, level_index
from experiment import (
    FiniteGuard,
    Loaders,
    Meter,
    Method,
    NonFiniteLoss,
    RunConfig,
    StepGraphs,
    UsageError,
    autocast,
    batches,
    make_backbone,
    option,
    plural,
    require,
)

MODES = ("maoal", "equal", "gcs", "single")
MODULES = ("block1", "block2", "block3", "block4", "block5")  # the modules lambda weighs: VGG-16's conv blocks


@dataclass
class Config(RunConfig):
    """The experiment: the paper's settings (edit here or pass the flag). The data and run settings are
    RunConfig's, in experiment.py."""

    primary_level: int | None = option(
        20,
        "primary task on CIFAR-100: number of classes in the hierarchy (other datasets: their classes)",
        choices=(3, 10, 20),
        type=int,
        reset_by=("dataset",),
    )
    aux_level: int = option(100, "auxiliary task: a finer level of the hierarchy", choices=(10, 20, 100))
    mode: str = option(
        "maoal",
        "maoal: lambda learned by implicit differentiation; the authors' baselines: equal (lambda = 1, Human's "
        "loss), gcs (a block's auxiliary gradient only where its cosine with the primary one is positive), "
        "single (lambda = 0)",
        choices=MODES,
    )
    epochs: int = option(200, "training epochs")
    batch_size: int = option(100, "images per batch, train, developing set and test")
    lr: float = option(0.01, "SGD learning rate, no momentum, no weight decay")
    lr_step: int = option(50, "the learning rate is multiplied by --lr-gamma every this many epochs")
    lr_gamma: float = option(0.5, "StepLR factor")
    focal_gamma: float = option(2.0, "focal loss exponent (paper: 2)")
    dev_size: int = option(
        500, "developing set: training images held out (stratified by primary class, drawn from --seed), every mode"
    )
    meta_every: int = option(20, "maoal: a hypergradient step on lambda after every this many training steps")
    neumann_terms: int = option(
        3,
        "maoal: J, the number of Hessian-vector products of the truncated Neumann series (the authors' truncate_iter)",
    )
    neumann_alpha: float = option(
        1.0,
        "maoal: alpha, the Neumann series' step: H^-1 ~ alpha * sum_j=0..J (I - alpha H)^j, H = dg/dW "
        "(the authors': 1)",
    )
    lambda_lr: float = option(1e-3, "maoal: SGD learning rate of rho, lambda = softplus(rho)")
    lambda_momentum: float = option(0.9, "maoal: SGD momentum of rho")
    hypergrad_clip: float = option(10.0, "maoal: the hypergradient's norm is clipped to this (the authors: 10)")


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

    def forward(self, x: torch.Tensor, detach_auxiliary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """With detach_auxiliary, the auxiliary head learns on the features but sends no gradient into the trunk."""
        features = self.features(x)
        return self.classifier1(features), self.classifier2(features.detach() if detach_auxiliary else features)


class ModuleWeights(nn.Module):
    """lambda, one entry per (auxiliary loss, module), as softplus(rho); rho starts where lambda = 1.

    softplus, not the authors' ReLU: a ReLU entry that goes below zero has zero gradient and stays off for good."""

    def __init__(self, num_auxiliary_losses: int, num_modules: int):
        super().__init__()
        self.rho = nn.Parameter(torch.full((num_auxiliary_losses, num_modules), math.log(math.expm1(1.0))))

    def forward(self) -> torch.Tensor:
        return F.softplus(self.rho)


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
# The method's mathematics
#
# Lower level: the network's parameters W follow g(W, lambda), for a trunk tensor in module b
#     g = grad L_pri + lambda_b * grad L_aux,
# each head its own loss's gradient. Upper level: lambda minimises L_dev(W*(lambda)), the primary loss on
# the developing set at the fixed point g(W*, lambda) = 0. By the implicit function theorem
#     d L_dev / d lambda = -(dg/dlambda)^T (dg/dW)^-T dL_dev/dW,
# the inverse applied by a truncated Neumann series, each term one vector-Jacobian product of g.


def trunk_modules(model: VGG16) -> list[int]:
    """The module (an index into MODULES) of each of model.shared_parameters(), in that order."""
    return [MODULES.index(name.split(".")[0]) for name, _ in model.named_parameters() if name.startswith("block")]


def weighted_gradients(
    primary_grads: list[torch.Tensor], aux_grads: list[torch.Tensor], weights: torch.Tensor, modules: list[int]
) -> list[torch.Tensor]:
    """grad L_pri + weights[b] * grad L_aux for each trunk tensor, b its module."""
    return [g + weights[b] * a for g, a, b in zip(primary_grads, aux_grads, modules)]


def module_cosines(
    primary_grads: list[torch.Tensor], aux_grads: list[torch.Tensor], modules: list[int], num_modules: int
) -> torch.Tensor:
    """The cosine between the primary and the auxiliary gradient of each module, its tensors taken as one vector
    (0 where either is zero)."""
    cosines = []
    for module in range(num_modules):
        pairs = [(g, a) for g, a, b in zip(primary_grads, aux_grads, modules) if b == module]
        dot = sum((g * a).sum() for g, a in pairs)
        norms = (sum(g.pow(2).sum() for g, _ in pairs) * sum(a.pow(2).sum() for _, a in pairs)).sqrt()
        cosines.append(torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0))
    return torch.stack(cosines)


def neumann_inverse_hvp(
    outputs: list[torch.Tensor], params: list[torch.Tensor], vector: list[torch.Tensor], alpha: float, terms: int
) -> list[torch.Tensor]:
    """H^-T v ~ alpha * sum_{j=0}^{terms} (I - alpha H^T)^j v, H = d outputs / d params (outputs with their graph).

    `terms` vector-Jacobian products. It converges where the eigenvalues of alpha H lie in the disc |1 - z| < 1
    and is exact when (I - alpha H)^(terms + 1) = 0. The authors' code (from AuxiLearn) returns the sum
    without the factor alpha; at their alpha = 1 the two agree."""
    term, total = list(vector), list(vector)
    for _ in range(terms):
        products = torch.autograd.grad(outputs, params, grad_outputs=term, retain_graph=True, materialize_grads=True)
        term = [t - alpha * p for t, p in zip(term, products)]
        total = [s + t for s, t in zip(total, term)]
    return [alpha * s for s in total]


def implicit_hypergradient(
    dev_grads: list[torch.Tensor],
    train_grads: list[torch.Tensor],
    params: list[torch.Tensor],
    hyperparams: list[torch.Tensor],
    alpha: float,
    terms: int,
) -> list[torch.Tensor]:
    """d L_dev / d hyperparams = -(dg/dhyper)^T (dg/dW)^-T dL_dev/dW, the inverse by neumann_inverse_hvp.

    dev_grads: dL_dev/dW; train_grads: g(W, hyper), differentiable w.r.t. params and hyperparams (their graph
    is freed). L_dev does not depend on the hyperparameters directly, so that term is zero."""
    inverse = neumann_inverse_hvp(train_grads, params, dev_grads, alpha, terms)
    products = torch.autograd.grad(train_grads, hyperparams, grad_outputs=inverse, materialize_grads=True)
    return [-p for p in products]


def task_losses(
    primary_logits: torch.Tensor, aux_logits: torch.Tensor, labels: torch.Tensor, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """The primary and the auxiliary focal loss of one batch."""
    primary, auxiliary = labels[:, level_index(cfg.primary_level)], labels[:, level_index(cfg.aux_level)]
    primary_loss = focal_loss(primary_logits, F.one_hot(primary, cfg.primary_level).float(), cfg.focal_gamma)
    aux_loss = focal_loss(aux_logits, F.one_hot(auxiliary, cfg.aux_level).float(), cfg.focal_gamma)
    return primary_loss, aux_loss


def lower_level_gradient(
    model: VGG16,
    primary_loss: torch.Tensor,
    aux_loss: torch.Tensor,
    weights: torch.Tensor | None,
    create_graph: bool = False,
) -> tuple[list[nn.Parameter], list[torch.Tensor], torch.Tensor]:
    """g for every parameter (trunk, primary head, auxiliary head: model.parameters()' order) and the weights it
    used: `weights` (lambda per module), or with None the gcs rule, 1 where a module's cosine is positive, else 0."""
    trunk, modules = model.shared_parameters(), trunk_modules(model)
    primary_head, aux_head = list(model.classifier1.parameters()), list(model.classifier2.parameters())
    primary_grads = torch.autograd.grad(
        primary_loss, trunk + primary_head, retain_graph=True, create_graph=create_graph
    )
    aux_grads = torch.autograd.grad(aux_loss, trunk + aux_head, retain_graph=create_graph, create_graph=create_graph)
    n = len(trunk)
    if weights is None:
        weights = (module_cosines(primary_grads[:n], aux_grads[:n], modules, len(MODULES)) > 0).to(primary_loss.dtype)
    trunk_grads = weighted_gradients(list(primary_grads[:n]), list(aux_grads[:n]), weights, modules)
    return trunk + primary_head + aux_head, trunk_grads + list(primary_grads[n:]) + list(aux_grads[n:]), weights


def hypergradient(
    model: VGG16,
    module_weights: ModuleWeights,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    dev_images: torch.Tensor,
    dev_labels: torch.Tensor,
    cfg: Config,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """d L_dev / d rho at the current W, g on the training batch; and the developing batch's primary loss and
    accuracy. BatchNorm uses batch statistics, as in training; running statistics, parameters and .grad stay."""
    params = dict(model.named_parameters())

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Throw-away copies of the running statistics: the upper level must not change the network it judges.
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        return functional_call(model, (params, buffers), (images,))

    dev_logits = forward(dev_images)[0]
    dev_primary = dev_labels[:, level_index(cfg.primary_level)]
    dev_loss = focal_loss(dev_logits, F.one_hot(dev_primary, cfg.primary_level).float(), cfg.focal_gamma)
    with torch.no_grad():
        dev_acc = (dev_logits.argmax(1) == dev_primary).float().mean()
    primary_loss, aux_loss = task_losses(*forward(train_images), train_labels, cfg)
    weights = module_weights()[0]
    params_in_order, train_grads, _ = lower_level_gradient(model, primary_loss, aux_loss, weights, create_graph=True)
    dev_grads = torch.autograd.grad(dev_loss, params_in_order, materialize_grads=True)
    grads = implicit_hypergradient(
        dev_grads, train_grads, params_in_order, list(module_weights.parameters()), cfg.neumann_alpha, cfg.neumann_terms
    )
    return grads, dev_loss.detach(), dev_acc


# ---------------------------------------------------------------------------------------------
# Training and evaluation steps


def train_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict:
    """One batch: an SGD step on g (lambda_b-weighted auxiliary gradient in module b, each head its own loss).
    Returns metrics as tensors, among them the weights lambda used, per module."""
    model, optimizer = state["model"], state["optimizer"]
    primary, auxiliary = labels[:, level_index(cfg.primary_level)], labels[:, level_index(cfg.aux_level)]
    one_backward = cfg.mode in ("equal", "single")
    # maoal and gcs take two gradients from one graph; a torch.compile'd network's backward may run only once
    # (donated buffers), so they run the eager network: same arithmetic.
    with autocast(cfg, images.device):
        primary_logits, aux_logits = (state["forward_model"] if one_backward else model)(
            images, detach_auxiliary=cfg.mode == "single"
        )
    primary_loss, aux_loss = task_losses(primary_logits, aux_logits, labels, cfg)
    out = {
        "loss": primary_loss + aux_loss,
        "train_primary_loss": primary_loss,
        "train_primary_acc": (primary_logits.argmax(1) == primary).float().mean(),
        "train_aux_loss": aux_loss,
        "train_aux_acc": (aux_logits.argmax(1) == auxiliary).float().mean(),
    }
    optimizer.zero_grad(set_to_none=True)
    if one_backward:
        # lambda = 1 in every module is Human's step; lambda = 0 (the trunk detached from the auxiliary head) is
        # Single's, the auxiliary head still learning on the features.
        out["loss"].backward()
        weights = torch.full((len(MODULES),), float(cfg.mode == "equal"), device=images.device)
    else:
        given = state["module_weights"]()[0].detach() if cfg.mode == "maoal" else None
        params, grads, weights = lower_level_gradient(model, primary_loss, aux_loss, given)
        for p, g in zip(params, grads):
            p.grad = g
    optimizer.step()
    out.update({f"lambda_{name}": weight for name, weight in zip(MODULES, weights)})
    return out


def meta_step(
    state: dict,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    dev_images: torch.Tensor,
    dev_labels: torch.Tensor,
    cfg: Config,
) -> dict:
    """The upper level: an SGD step of rho (lambda = softplus(rho)) along the implicit hypergradient, its norm
    clipped to --hypergrad-clip. Always fp32, also with --amp. Returns the developing batch's primary loss and
    accuracy and the hypergradient's norm before clipping (tensors)."""
    module_weights = state["module_weights"]
    grads, dev_loss, dev_acc = hypergradient(
        state["model"], module_weights, train_images, train_labels, dev_images, dev_labels, cfg
    )
    for p, g in zip(module_weights.parameters(), grads):
        p.grad = g
    norm = torch.nn.utils.clip_grad_norm_(list(module_weights.parameters()), cfg.hypergrad_clip)
    state["lambda_optimizer"].step()
    return {"dev_primary_loss": dev_loss, "dev_primary_acc": dev_acc, "hypergrad_norm": norm}


def developing_batches(loader, cfg: Config, device: torch.device):
    """The developing set's batches, pass after pass (each pass shuffled anew by the loader's generator)."""
    while True:
        for _, images, labels in batches(loader, cfg, device, phase=None):  # between training steps: no line
            yield images, labels


def train_epoch(
    state: dict, graphs: StepGraphs, loaders: Loaders, cfg: Config, device: torch.device, epoch: int
) -> dict[str, float]:
    """One pass over the train set; in maoal mode, a step of lambda after every --meta-every steps (counted from
    the epoch's start) on the next developing batch and the training batch just used."""
    meter = Meter()
    guard, meta_guard = FiniteGuard(device), FiniteGuard(device)
    state["model"].train()
    train = functools.partial(train_step, state, cfg=cfg)
    dev = developing_batches(loaders.dev, cfg, device) if cfg.mode == "maoal" else None
    for step, images, labels in batches(loaders.train, cfg, device):
        out = graphs("train", train, images, labels)
        guard.watch(out.pop("loss"), epoch, "train", step)
        for name in MODULES:
            meter.add(f"lambda_{name}", out.pop(f"lambda_{name}"), 1)
        for name, value in out.items():
            meter.add(name, value, images.shape[0])
        if dev is not None and (step + 1) % cfg.meta_every == 0:
            dev_images, dev_labels = next(dev)
            # Eager, not a CUDA graph: it needs two batches, and runs once every --meta-every steps.
            stats = meta_step(state, images, labels, dev_images, dev_labels, cfg)
            if not torch.isfinite(stats["hypergrad_norm"]):  # checked at once: lambda would turn NaN next
                raise NonFiniteLoss(
                    f"non-finite hypergradient at epoch {epoch}, meta step after train step {step + 1}; the run "
                    "stopped",
                    hint="Its Neumann series diverges: try a smaller --neumann-alpha, or fewer --neumann-terms",
                )
            meta_guard.watch(stats["dev_primary_loss"], epoch, "meta", step)
            meter.add("hypergrad_norm", stats.pop("hypergrad_norm"), 1)
            for name, value in stats.items():
                meter.add(name, value, dev_images.shape[0])
    guard.check(epoch, "train")
    meta_guard.check(epoch, "meta")
    return meter.means()


# Copied from model_vgg_human.py
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


def build(cfg: Config, device: torch.device) -> dict:
    """Network, lambda, their optimisers and the network's scheduler. Keys without 'forward_' are saved in the
    checkpoint. lambda (ModuleWeights) is there in every mode; only maoal mode uses and updates it."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = VGG16(cfg.primary_level, cfg.aux_level, make_backbone(cfg)).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    module_weights = ModuleWeights(1, len(MODULES)).to(device)
    return {
        "model": model,
        "module_weights": module_weights,
        "optimizer": optimizer,
        "lambda_optimizer": torch.optim.SGD(
            module_weights.parameters(), lr=cfg.lambda_lr, momentum=cfg.lambda_momentum
        ),
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma),
        "forward_model": torch.compile(model) if cfg.compile else model,
    }


def epoch_line(record: dict, epochs: int) -> str:
    r = record
    dev = (
        f"| dev pri {r['dev_primary_loss']:.4f} {100 * r['dev_primary_acc']:5.2f}% hypergrad {r['hypergrad_norm']:.3g} "
        if "dev_primary_loss" in r
        else ""
    )
    lambdas = " ".join(f"{r['lambda_' + name]:.3f}" for name in MODULES)
    return (
        f"epoch {r['epoch']:3d}/{epochs} "
        f"| train pri {r['train_primary_loss']:.4f} {100 * r['train_primary_acc']:5.2f}% "
        f"aux {r['train_aux_loss']:.4f} {100 * r['train_aux_acc']:5.2f}% "
        f"| lambda {lambdas} {dev}"
        f"| test pri {r['test_primary_loss']:.4f} {100 * r['test_primary_acc']:5.2f}% "
        f"aux {r['test_aux_loss']:.4f} {100 * r['test_aux_acc']:5.2f}% | {r['seconds']:.1f}s"
    )


# ---------------------------------------------------------------------------------------------
# Settings: checks, run names, published figures


def check_config(cfg: Config) -> Config:
    """Refuse impossible settings before anything runs; return the config to run."""
    require(
        cfg,
        at_least_1=("epochs", "batch_size", "lr_step", "dev_size", "meta_every", "neumann_terms"),
        at_least_0=("focal_gamma", "lambda_momentum"),
        positive=("lr", "lr_gamma", "neumann_alpha", "lambda_lr", "hypergrad_clip"),
    )
    if cfg.aux_level <= cfg.primary_level:
        raise UsageError(
            f"--aux-level {cfg.aux_level} must be finer than --primary-level {cfg.primary_level} "
            f"(choose from {', '.join(str(n) for n in LEVELS if n > cfg.primary_level)})"
        )
    return cfg


def run_name_stem(cfg: Config) -> str:
    return f"maoal-{cfg.mode}-pri{cfg.primary_level}-aux{cfg.aux_level}-seed{cfg.seed}"


def paper_settings(cfg: Config) -> dict:
    """The paper's values of the settings that change the result and are not in run_name_stem.

    A fixed record, not Config's defaults: a run whose settings differ gets a hash of them in its name.
    The upper level's settings count in maoal mode only: the baselines do not use them."""
    paper = {"batch_size": 100, "lr": 0.01, "lr_step": 50, "lr_gamma": 0.5, "focal_gamma": 2.0, "dev_size": 500}
    if cfg.mode == "maoal":
        paper |= {
            "meta_every": 20,
            "neumann_terms": 3,
            "neumann_alpha": 1.0,
            "lambda_lr": 1e-3,
            "lambda_momentum": 0.9,
            "hypergrad_clip": 10.0,
        }
    return paper


def dev_quotas(class_counts: np.ndarray, dev_size: int) -> np.ndarray:
    """Images per class in a developing set of dev_size, stratified: each class's share of dev_size, rounded by
    largest remainder (ties to the lower class) so that they sum to dev_size."""
    shares = dev_size * class_counts / class_counts.sum()
    quotas = np.floor(shares).astype(np.int64)
    quotas[np.argsort(quotas - shares, kind="stable")[: dev_size - quotas.sum()]] += 1
    return quotas


def held_out(train_set: CIFAR100, cfg: Config) -> np.ndarray:
    """Indices of the developing set: --dev-size training images, stratified by primary class, drawn from --seed.
    Held out in every mode, so that the four train on the same images."""
    primary = train_set.labels[:, level_index(cfg.primary_level)].numpy()
    counts = np.bincount(primary, minlength=cfg.primary_level)
    quotas = dev_quotas(counts, cfg.dev_size)
    emptied = np.flatnonzero((quotas >= counts) & (counts > 0))
    if len(emptied):
        c = emptied[0]
        raise UsageError(
            f"--dev-size {cfg.dev_size} is more than this training set allows: stratified by primary class, class "
            f"{c} has {plural(counts[c], 'training image')} and its share would be {quotas[c]}, leaving it none; "
            f"choose a smaller --dev-size"
        )
    rng = np.random.default_rng(cfg.seed)
    chosen = [rng.choice(np.flatnonzero(primary == c), size=q, replace=False) for c, q in enumerate(quotas) if q]
    return np.sort(np.concatenate(chosen))


def derived_settings(cfg: Config) -> dict:
    """Values computed from the flags, stored beside them in metrics.json."""
    return {"aux_classes": cfg.aux_level, "lambda_modules": list(MODULES)}


def published_accuracy(cfg: Config) -> dict[str, float]:
    """Published test accuracy (%) for this configuration, where one exists: none (unpublished_because)."""
    return {}


def unpublished_because(cfg: Config) -> str:
    return (
        "the MAOAL authors' CIFAR-100 experiment is another setting (ResNet-18, one superclass's 5 classes as the "
        "target task, ten others as auxiliary tasks), and Human's figures hold no developing set out"
    )


# ---------------------------------------------------------------------------------------------
# The method, handed to the run machinery (experiment.py)

METHOD = Method(
    name="maoal",
    config=Config,
    description=__doc__,
    check_config=check_config,
    run_name_stem=run_name_stem,
    paper_settings=paper_settings,
    build=build,
    train_epoch=train_epoch,
    eval_step=eval_step,
    epoch_line=epoch_line,
    derived_settings=derived_settings,
    published_accuracy=published_accuracy,
    unpublished_because=unpublished_because,
    cifar100_only="its auxiliary task is the finer level of CIFAR-100's hierarchy, --aux-level",
    backbones=("vgg16",),  # lambda weighs MODULES, VGG-16's five conv blocks
    held_out=held_out,
)


def main(argv: list[str] | None = None) -> None:
    experiment.main(METHOD, argv)


if __name__ == "__main__":
    main()
