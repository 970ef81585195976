"""Auto-Lambda: task weights meta-learned for a primary task (Liu, James, Davison, Johns, TMLR 2022), on its
authors' CIFAR-100 multi-domain experiment, with their weighting baselines.

CIFAR-100 cut into its 20 superclasses, each a 5-way task on its own images (the fine labels renumbered within the
superclass). Every domain is a training task with its own head on one VGG-16 (the authors' MTLVGG16: shared
convolutions, one BatchNorm per task); one domain, --primary-domain, is the primary task, evaluated on its test
images. Every step takes one batch of every domain and an SGD step on sum_i lambda_i L_i. The weights lambda:
--weighting equal (1), dwa (Dynamic Weight Average), uncert (learned uncertainties) or autol: Auto-Lambda, where
lambda minimises the primary loss on a second batch of the training data after one virtual SGD step of the network
(the optimiser's own step: learning rate, momentum buffer and weight decay), a step of Adam along the meta-gradient
dJ/dlambda_i = -alpha <d, grad L_i>, d the primary loss's gradient at the virtual weights. Exact by default (the
directional derivatives of every task's loss along d in one forward-mode pass), or the authors' finite difference.

    python model_vgg_autol.py                                     # Auto-Lambda, primary domain 0, 200 epochs
    python model_vgg_autol.py --primary-domain 14 --weighting dwa  # DWA, primary: people
    python model_vgg_autol.py --meta-grad finite-difference       # the authors' approximation of the meta-gradient
    python model_vgg_autol.py --task maoal-domains                # MAOAL's: target 14, auxiliary 0-9, ResNet-18
    python model_vgg_autol.py --smoke                             # install check on CPU: two steps of 20 domains

To change the experiment, edit `Config` below or pass the flag: every field is one, and the two are the same.
main(), at the bottom, holds the run loop; it calls experiment.py for the run machinery (flags, the run folder,
checkpoints, resume). Prints one line per epoch (the primary task's train loss and accuracy, the mean training loss
of all tasks, autol's meta loss, the primary task's test loss and accuracy, lambda of the primary task and of the
largest others) and writes results/<run-name>/metrics.json (every task's train loss and lambda) and checkpoint.pt
after every epoch; --resume continues. Cost: an equal, dwa or uncert step is 20 forward and backward passes of
a batch of 32; an autol step adds the virtual step (the same again), the meta batch's forward and backward, and 20
forward-mode passes: about 2.6x (benchmarks/README.md, measured on a CPU).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import experiment
from create_dataset import DOMAIN_LABEL, domain_classes, domain_indices, level_index
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
    require,
    setting,
)

WEIGHTINGS = ("equal", "dwa", "uncert", "autol")
TASKS = ("all-domains", "maoal-domains")
# The settings whose value depends on --task: None in Config, resolved by Config.__post_init__ (the backbone,
# RunConfig's, by paper_backbone). maoal-domains is the MAOAL authors' CIFAR-100/20 (model_vgg_maoal.py --task
# domains): its target domain, auxiliary domains and developing set held out, so that Auto-Lambda trains on the
# images every row of `tables.py maoal` trains on.
TASK_DEFAULTS = {
    "all-domains": dict(primary_domain=0, aux_domains="all", dev_fraction=0.0),
    "maoal-domains": dict(primary_domain=14, aux_domains="0-9", dev_fraction=0.05),
}
META_GRADIENT_METHODS = ("second-order", "finite-difference", "double-backward")
NUM_DOMAINS = 20  # CIFAR-100's superclasses
DOMAIN_CLASSES = 5  # fine classes per superclass
# The authors' MTLVGG16 (lorenmt/auto-lambda, create_network.py): 13 convolutions, a max-pool after the first four
# blocks only, then the 2x2 map averaged: 512 features.
VGG16_FILTERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# The authors' Normalize (trainer_cifar.py): CIFAR-100's channel means and deviations.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)

# Forward-mode AD through BatchNorm (the meta-gradient) makes torch import its JVP decompositions, which call
# the deprecated torch.jit.script: a note on torch's own internals, of no use to whoever runs this script.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning, module="torch")


@dataclass
class Config(RunConfig):
    """The experiment: the authors' settings (lorenmt/auto-lambda, trainer_cifar.py; edit here or pass the flag).
    The data and run settings are RunConfig's, in experiment.py."""

    primary_level: int | None = option(
        None,
        "the level of CIFAR-100's hierarchy whose classes are the domains: 20, the superclasses (the only choice; "
        "each domain is one superclass's 5 fine classes)",
        choices=(20,),
        type=int,
    )
    task: str = option(
        "all-domains",
        "all-domains: the Auto-Lambda authors' (every superclass a training task, VGG-16); maoal-domains: the MAOAL "
        "authors' (primary domain 14, the others 0-9, 5%% of the primary's training images held out, ResNet-18)",
        choices=TASKS,
    )
    primary_domain: int | None = option(
        None,
        "the primary task: this superclass's 5-way task, tested on its test images (the authors' --subset_id; "
        "default: 0 all-domains, 14 maoal-domains)",
        type=int,
    )
    aux_domains: str | None = option(
        None,
        "the other training tasks: all (the other 19 superclasses) or superclasses such as 0-9 or 0,3,5 (default: "
        "all all-domains, 0-9 maoal-domains)",
        type=str,
    )
    dev_fraction: float | None = option(
        None,
        "this fraction of the primary domain's training images is held out and never trained on (stratified by "
        "class, drawn from --seed): MAOAL's developing set (default: 0 all-domains, 0.05 maoal-domains)",
        type=float,
    )
    weighting: str = option(
        "autol",
        "the task weights lambda: equal (1), dwa (Dynamic Weight Average: from the tasks' training-loss ratios), "
        "uncert (1/(2 exp(s_i)) + s_i/2, the log variances s learned), autol (Auto-Lambda: meta-learned)",
        choices=WEIGHTINGS,
    )
    epochs: int = option(200, "training epochs; the learning rate anneals to 0 over them (cosine)")
    batch_size: int = option(32, "images per batch of every domain, train and test (the authors': 32)")
    lr: float = option(0.1, "SGD learning rate of the network (the authors': 0.1), cosine-annealed over --epochs")
    momentum: float = option(0.9, "SGD momentum (the authors': 0.9)")
    weight_decay: float = option(5e-4, "SGD weight decay (the authors': 5e-4)")
    renormalize: bool = option(
        True,
        "normalise the inputs by CIFAR-100's channel means and deviations, as the authors (the loaders' 0.5 and 0.2, "
        "undone by an affine map in the network)",
    )
    dwa_temperature: float = option(2.0, "dwa: temperature of the softmax over the loss ratios (the authors': 2)")
    uncert_init: float = option(
        -0.7, "uncert: initial log variance s of every task (the authors': -0.7); trained by the network's SGD"
    )
    autol_init: float = option(0.1, "autol: initial lambda of every task (the authors': 0.1)")
    autol_lr: float = option(3e-4, "autol: Adam learning rate of lambda (the authors' CIFAR-100 setting: 3e-4)")
    meta_grad: str = option(
        "second-order",
        "autol: the meta-gradient exactly (forward mode, one pass along d), the authors' central finite difference, "
        "or exactly by double backward (slower; the test oracle)",
        choices=META_GRADIENT_METHODS,
    )
    fd_step: float = option(0.01, "finite-difference: eps = fd_step / ||d|| (the authors': 0.01)")

    def __post_init__(self):
        for name, value in TASK_DEFAULTS.get(self.task, TASK_DEFAULTS["all-domains"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()  # the backbone: the task's paper_backbone

    @property
    def paper_backbone(self) -> str:
        """The authors' network: VGG-16 (their MTLVGG16) on theirs, ResNet-18 on the MAOAL authors' task."""
        return "resnet18" if self.task == "maoal-domains" else "vgg16"


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


def register_renormalization(module: nn.Module, renormalize: bool) -> None:
    """Buffers that map the loaders' (0.5, 0.2) normalisation affinely onto CIFAR-100's (an affine map of the same
    pixels, the crop's zero padding included). Not saved: constants."""
    scale = torch.tensor([0.2 / s for s in CIFAR100_STD]).view(1, 3, 1, 1)
    shift = torch.tensor([(0.5 - m) / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)]).view(1, 3, 1, 1)
    module.renormalize = renormalize
    module.register_buffer("input_scale", scale, persistent=False)
    module.register_buffer("input_shift", shift, persistent=False)


def renormalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x * module.input_scale.to(x.dtype) + module.input_shift.to(x.dtype) if module.renormalize else x


class TaskBatchNorm2d(nn.Module):
    """One BatchNorm2d per task (the authors' ConditionalBatchNorm2d): the convolutions are shared, each task
    normalises with its own statistics and affine parameters."""

    def __init__(self, num_features: int, num_tasks: int):
        super().__init__()
        self.bn_list = nn.ModuleList(nn.BatchNorm2d(num_features) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.bn_list[task](x)


class MTLVGG16(nn.Module):
    """The authors' multi-domain VGG-16 (MTLVGG16), their state-dict layout: `network_block` (convolutions, per-task
    BatchNorms, ReLUs, four max-pools), the last map averaged, one linear head per task in `classifier`. PyTorch's
    default initialisation, as theirs. forward(x, task) -> that task's logits."""

    def __init__(self, num_tasks: int, num_classes: int = DOMAIN_CLASSES, filters=VGG16_FILTERS, renormalize=True):
        super().__init__()
        layers, channels = [], 3
        for f in filters:
            if f == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, f, 3, padding=1), TaskBatchNorm2d(f, num_tasks), nn.ReLU(inplace=True)]
                channels = f
        self.network_block = nn.Sequential(*layers)
        self.classifier = nn.ModuleList(nn.Sequential(nn.Linear(channels, num_classes)) for _ in range(num_tasks))
        register_renormalization(self, renormalize)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        x = renormalized(self, x)
        for layer in self.network_block:
            x = layer(x, task) if isinstance(layer, TaskBatchNorm2d) else layer(x)
        return self.classifier[task](F.adaptive_avg_pool2d(x, 1).flatten(1))


class DomainNet(Trunk):
    """Another backbone (--backbone resnet18: MAOAL's network) shared by every task, its BatchNorms too, and one
    linear head per task on its features (PyTorch's default initialisation). forward(x, task) -> that task's logits."""

    def __init__(self, num_tasks: int, backbone: nn.Module, num_classes: int = DOMAIN_CLASSES, renormalize=True):
        super().__init__(backbone)
        self.classifier = nn.ModuleList(nn.Linear(self.num_features, num_classes) for _ in range(num_tasks))
        register_renormalization(self, renormalize)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.classifier[task](self.features(renormalized(self, x)))


# ---------------------------------------------------------------------------------------------
# Losses and the weightings


# Copied from model_vgg_single.py
def focal_terms(logits: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-sample, per-class focal terms -(1 - p)^gamma log p, with p = softmax(logits), in float32 or wider."""
    log_p = F.log_softmax(at_least_float32(logits), dim=1)
    return -(1 - log_p.exp()).pow(gamma) * log_p


# Copied from model_vgg_single.py
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss against a target distribution (one-hot or soft), averaged over the batch."""
    return (target * focal_terms(logits, gamma)).sum(1).mean()


def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (the focal loss at gamma 0), the authors' loss of every task, averaged over the batch."""
    return focal_loss(logits, F.one_hot(target, logits.shape[1]).to(at_least_float32(logits).dtype), 0.0)


# Copied from model_vgg_maoal.py
def domain_targets(labels: torch.Tensor) -> torch.Tensor:
    """A domain task's labels (0-4) from (N, 4) hierarchy labels: the fine labels renumbered within their domain."""
    return torch.as_tensor(DOMAIN_LABEL, device=labels.device)[labels[:, level_index(100)]]


def dwa_weights(last: torch.Tensor, before_last: torch.Tensor, temperature: float) -> torch.Tensor:
    """Dynamic Weight Average (Liu et al. 2019): lambda = K softmax(w / T), w_i = L_i(e - 1) / L_i(e - 2), each
    task's mean training loss in the last two epochs."""
    return len(last) * torch.softmax(last / before_last / temperature, dim=0)


def uncertainty_loss(losses: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """Kendall et al. 2018, as the authors write it: sum_i L_i / (2 exp(s_i)) + s_i / 2."""
    return (losses / (2 * log_variance.exp()) + log_variance / 2).sum()


class TaskWeights(nn.Module):
    """lambda, one weight per training task, by --weighting: equal, dwa (from `epoch_losses`, the tasks' mean
    training losses of the last two epochs), uncert (`log_variance`, trained with the network), autol
    (`meta_weights`, trained by meta_step). All are kept in every mode, so that every checkpoint has one layout."""

    def __init__(self, num_tasks: int, cfg: Config):
        super().__init__()
        self.weighting, self.temperature = cfg.weighting, cfg.dwa_temperature
        self.meta_weights = nn.Parameter(torch.full((num_tasks,), cfg.autol_init))
        self.log_variance = nn.Parameter(torch.full((num_tasks,), cfg.uncert_init))
        self.register_buffer("epoch_losses", torch.full((2, num_tasks), float("nan")))
        self.register_buffer("dwa", torch.ones(num_tasks))

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        """The training loss from every task's loss (autol's lambda taken as given: meta_step trains it)."""
        if self.weighting == "uncert":
            return uncertainty_loss(losses, self.log_variance)
        return (self.weights() * losses).sum()

    def weights(self) -> torch.Tensor:
        """lambda (uncert: 1 / (2 exp(s)), the factor of each loss), without a graph."""
        weights = {
            "equal": torch.ones_like(self.dwa),
            "dwa": self.dwa,
            "uncert": 1 / (2 * self.log_variance.exp()),
            "autol": self.meta_weights,
        }[self.weighting]
        return weights.detach()

    @torch.no_grad()
    def start_epoch(self) -> None:
        """dwa: this epoch's lambda; 1 for the first two epochs, which have no two losses before them."""
        if not self.epoch_losses.isnan().any():
            self.dwa.copy_(dwa_weights(self.epoch_losses[1], self.epoch_losses[0], self.temperature))

    @torch.no_grad()
    def end_epoch(self, losses: torch.Tensor) -> None:
        self.epoch_losses.copy_(torch.stack([self.epoch_losses[1], losses.to(self.epoch_losses)]))


# ---------------------------------------------------------------------------------------------
# Auto-Lambda's meta-gradient
#
# One virtual step of SGD with momentum and weight decay, as the optimiser would take it on sum_i lambda_i L_i:
#     theta+ = theta - alpha (mu b + sum_i lambda_i grad L_i(theta) + wd theta),  b the momentum buffer,
# and J(lambda) = L_pri(theta+) on another batch of the primary domain. Only the gradient term depends on lambda,
# so dtheta+/dlambda_i = -alpha grad L_i(theta) and, with d = grad J(theta+),
#     dJ/dlambda_i = -alpha <d, grad L_i(theta)>,
# the directional derivative of every task's loss along d: loss_slopes, by one forward-mode pass (second-order), or
# as the authors by a central difference of the losses at theta +- eps d (finite-difference); double_backward
# backpropagates through the virtual step instead (the test oracle).


def momentum_buffers(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor | None]:
    """The SGD momentum buffer of each of the network's parameters, by name (None before the first step)."""
    return {name: optimizer.state.get(p, {}).get("momentum_buffer") for name, p in model.named_parameters()}


def virtual_step(
    theta: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor | None],
    alpha: float,
    momentum: float,
    weight_decay: float,
) -> dict[str, torch.Tensor]:
    """theta - alpha (momentum * buffer + grad + weight_decay * theta): the step torch.optim.SGD takes (no
    dampening, no Nesterov), as the authors' virtual_step writes it; a missing buffer counts as zero."""
    step = {}
    for name, p in theta.items():
        direction = grads[name] + weight_decay * p
        if buffers.get(name) is not None:
            direction = direction + momentum * buffers[name]
        step[name] = p - alpha * direction
    return step


def functional_forward(model: nn.Module, params: dict, buffers: dict):
    """The network as a function (images, task) -> logits of `params`; its running statistics go to `buffers`."""
    return lambda images, task: functional_call(model, (params, buffers), (images, task))


def task_losses(forward, task_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(T,): each task's loss on its own batch, batch t scored by head t."""
    return torch.stack([task_loss(forward(images, t), target) for t, (images, target) in enumerate(task_batches)])


@dataclass
class Unrolled:
    """The virtual step and what the meta-gradient needs of it."""

    theta: dict[str, torch.Tensor]  # the network's parameters, detached
    buffers: dict[str, torch.Tensor]  # throw-away copies of its running statistics
    direction: dict[str, torch.Tensor]  # d = grad J(theta+)
    meta_loss: torch.Tensor  # J = L_pri(theta+) on the meta batch


def unrolled_step(
    model: nn.Module, task_batches: list, meta_batch: tuple, primary: int, weights: torch.Tensor, hyper: dict
) -> Unrolled:
    """theta+ by virtual_step on sum_i lambda_i L_i (lambda = `weights`, constants), J on the meta batch at theta+ by
    head `primary`, and d. BatchNorm uses batch statistics, as in training; nothing of the network changes. `hyper`:
    the step's alpha, momentum, weight_decay and the momentum buffers."""
    theta = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.enable_grad():
        leaves = {name: p.clone().requires_grad_() for name, p in theta.items()}
        losses = task_losses(functional_forward(model, leaves, buffers), task_batches)
        grads = torch.autograd.grad((weights.detach() * losses).sum(), list(leaves.values()), materialize_grads=True)
        theta_plus = virtual_step(theta, dict(zip(theta, grads)), **hyper)
        theta_plus = {name: p.requires_grad_() for name, p in theta_plus.items()}
        images, target = meta_batch
        meta_loss = task_loss(functional_forward(model, theta_plus, buffers)(images, primary), target)
        d = torch.autograd.grad(meta_loss, list(theta_plus.values()), allow_unused=True, materialize_grads=True)
    return Unrolled(theta, buffers, dict(zip(theta, d)), meta_loss.detach())


def loss_slopes(model: nn.Module, task_batches: list, step: Unrolled, method: str, fd_step: float) -> torch.Tensor:
    """(T,): <d, grad L_i(theta)>, each task's loss differentiated along d: exactly by forward mode (second-order),
    or by the authors' central difference at theta +- eps d, eps = fd_step / ||d|| (finite-difference)."""
    d = step.direction
    with torch.no_grad():
        if method == "finite-difference":
            eps = fd_step / torch.sqrt(sum(v.pow(2).sum() for v in d.values()))

            def shifted_losses(sign: int) -> torch.Tensor:
                shifted = {name: p + sign * eps * d[name] for name, p in step.theta.items()}
                return task_losses(functional_forward(model, shifted, step.buffers), task_batches)

            return (shifted_losses(+1) - shifted_losses(-1)) / (2 * eps)
        try:
            with fwAD.dual_level():
                dual = {name: fwAD.make_dual(p, d[name]) for name, p in step.theta.items()}
                losses = task_losses(functional_forward(model, dual, step.buffers), task_batches)
                return fwAD.unpack_dual(losses).tangent
        except NotImplementedError as error:
            raise UsageError(
                f"--meta-grad second-order: torch {torch.__version__} has no forward-mode rule for a layer of this "
                f"network ({str(error).splitlines()[0]}); use --meta-grad double-backward (exact, slower)"
            ) from None


def double_backward(
    model: nn.Module, task_batches: list, meta_batch: tuple, primary: int, weights: torch.Tensor, hyper: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """dJ/dlambda by backpropagating J through the virtual step (create_graph=True): exact, slowest; the oracle.
    Returns it and J."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    params = {name: p.detach().requires_grad_() for name, p in model.named_parameters()}
    weights = weights.detach().requires_grad_()
    with torch.enable_grad():
        losses = task_losses(functional_forward(model, params, buffers), task_batches)
        grads = torch.autograd.grad(
            (weights * losses).sum(), list(params.values()), create_graph=True, materialize_grads=True
        )
        theta_plus = virtual_step(params, dict(zip(params, grads)), **hyper)
        images, target = meta_batch
        meta_loss = task_loss(functional_forward(model, theta_plus, buffers)(images, primary), target)
        (grad,) = torch.autograd.grad(meta_loss, [weights])
    return grad, meta_loss.detach()


def meta_gradient(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task_batches: list,
    meta_batch: tuple,
    primary: int,
    weights: torch.Tensor,
    method: str = "second-order",
    fd_step: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dJ/dlambda for lambda = `weights`, by `method` (META_GRADIENT_METHODS), and J. The virtual step is the
    optimiser's: its current learning rate (alpha), momentum, weight decay and momentum buffers. The network's
    parameters, running statistics and .grad are left as they were."""
    if method not in META_GRADIENT_METHODS:
        raise ValueError(f"unknown meta-gradient method {method!r}; one of {META_GRADIENT_METHODS}")
    group = optimizer.param_groups[0]
    if group["nesterov"] or group["dampening"]:
        raise ValueError("the virtual step is SGD's without dampening or Nesterov momentum")
    hyper = dict(
        buffers=momentum_buffers(model, optimizer),
        alpha=group["lr"],
        momentum=group["momentum"],
        weight_decay=group["weight_decay"],
    )
    if method == "double-backward":
        return double_backward(model, task_batches, meta_batch, primary, weights, hyper)
    step = unrolled_step(model, task_batches, meta_batch, primary, weights, hyper)
    return -group["lr"] * loss_slopes(model, task_batches, step, method, fd_step), step.meta_loss


# ---------------------------------------------------------------------------------------------
# Training and evaluation steps


def train_step(state: dict, task_batches: list, cfg: Config) -> dict:
    """One SGD step of the network (and, uncert, of the log variances) on the weighted sum of every task's loss on
    its own batch. Returns the step's metrics as tensors (every task's loss, the primary task's accuracy)."""
    optimizer, primary = state["optimizer"], state["primary_task"]
    with autocast(cfg, task_batches[0][0].device):
        logits = [state["forward_model"](images, t) for t, (images, _) in enumerate(task_batches)]
    losses = torch.stack([task_loss(out, target) for out, (_, target) in zip(logits, task_batches)])
    loss = state["task_weights"].loss(losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {
        "loss": loss.detach(),
        "task_losses": losses.detach(),
        "train_primary_acc": (logits[primary].argmax(1) == task_batches[primary][1]).float().mean(),
    }


def meta_step(state: dict, task_batches: list, meta_batch: tuple, cfg: Config) -> torch.Tensor:
    """autol: a step of Adam on lambda along the meta-gradient, before the training step on the same batches (as
    the authors). Always fp32, also with --amp. Returns J, the meta batch's primary loss after the virtual step."""
    task_weights = state["task_weights"]
    grad, meta_loss = meta_gradient(
        model=state["model"],
        optimizer=state["optimizer"],
        task_batches=task_batches,
        meta_batch=meta_batch,
        primary=state["primary_task"],
        weights=task_weights.meta_weights,
        method=cfg.meta_grad,
        fd_step=cfg.fd_step,
    )
    task_weights.meta_weights.grad = grad
    state["meta_optimizer"].step()
    task_weights.meta_weights.grad = None
    return meta_loss


# Copied from model_vgg_maoal.py
def endless_batches(loader, cfg: Config, device: torch.device):
    """A loader's batches, pass after pass (each pass shuffled anew by the loader's generator)."""
    while True:
        for _, images, labels in batches(loader, cfg, device, phase=None):  # between training steps: no line
            yield images, labels


def train_epoch(state: dict, data, cfg: Config, device: torch.device, epoch: int) -> dict[str, float]:
    """One pass over the primary domain's training images, data.train; each step also takes the next batch of every
    other task's domain (data.auxiliary, in task order) and, autol, of the primary domain's second shuffle (the last
    of data.auxiliary), their passes restarting each epoch. Returns the means of the epoch, every task's loss
    among them (named by its domain); dwa's lambda is set at its start from the two epochs before."""
    meter = Meter()
    guard = FiniteGuard(device)
    state["model"].train()
    task_weights, primary, domains = state["task_weights"], state["primary_task"], state["domains"]
    task_weights.start_epoch()
    autol = cfg.weighting == "autol"
    streams = [endless_batches(loader, cfg, device) for loader in data.auxiliary]
    for step, images, labels in batches(data.train, cfg, device):
        drawn = [next(stream) for stream in streams]
        others = drawn[:-1] if autol else drawn
        task_batches = [(x, domain_targets(y)) for x, y in [*others[:primary], (images, labels), *others[primary:]]]
        if autol:
            meta_images, meta_labels = drawn[-1]
            meter.add(
                "meta_primary_loss",
                meta_step(state, task_batches, (meta_images, domain_targets(meta_labels)), cfg),
                len(meta_images),
            )
        out = train_step(state, task_batches, cfg)
        guard.watch(out.pop("loss"), epoch, "train", step)
        for t, loss in enumerate(out.pop("task_losses")):
            meter.add(f"train_loss_{domains[t]}", loss, len(task_batches[t][0]))
        meter.add("train_primary_acc", out["train_primary_acc"], len(images))
    guard.check(epoch, "train")
    metrics = meter.means()
    losses = torch.tensor([metrics[f"train_loss_{d}"] for d in domains])
    task_weights.end_epoch(losses)
    metrics |= {
        "train_primary_loss": metrics[f"train_loss_{domains[primary]}"],
        "train_mean_loss": losses.mean().item(),
    }
    return metrics | {f"lambda_{d}": w for d, w in zip(domains, task_weights.weights().tolist())}


def eval_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict:
    """Test metrics of one batch of the primary domain's test images, scored by its head, as tensors."""
    target = domain_targets(labels)
    with autocast(cfg, images.device):
        logits = state["forward_model"](images, state["primary_task"])
    return {
        "test_primary_loss": task_loss(logits, target),
        "test_primary_acc": (logits.argmax(1) == target).float().mean(),
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


# Copied from model_vgg_maoal.py
def aux_domain_list(text: str) -> tuple[int, ...]:
    """--aux-domains as superclass numbers: '0-9' or '0,3,5' (ranges and single ones, comma-separated)."""
    domains = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        domains += list(range(int(first), int(last or first) + 1))
    return tuple(domains)


def task_domains(cfg: Config) -> tuple[int, ...]:
    """The training tasks' superclasses, ascending: task t is domain task_domains(cfg)[t] (all 20 by default)."""
    others = range(NUM_DOMAINS) if cfg.aux_domains == "all" else aux_domain_list(cfg.aux_domains)
    return tuple(sorted({cfg.primary_domain, *others}))


def make_network(cfg: Config, num_tasks: int) -> nn.Module:
    if cfg.backbone == "vgg16":
        return MTLVGG16(num_tasks, renormalize=cfg.renormalize)
    return DomainNet(num_tasks, make_backbone(cfg), renormalize=cfg.renormalize)


def build(cfg: Config, device: torch.device) -> dict:
    """The network, the task weights, their optimisers and the network's cosine schedule (the authors': SGD over the
    network and, uncert, the log variances; Adam over autol's lambda); forward_model is the network as the steps run
    it (compiled with --compile)."""
    domains = task_domains(cfg)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = make_network(cfg, len(domains)).to(device, memory_format=memory_format)
    task_weights = TaskWeights(len(domains), cfg).to(device)
    trained = list(model.parameters()) + ([task_weights.log_variance] if cfg.weighting == "uncert" else [])
    optimizer = torch.optim.SGD(trained, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return {
        "model": model,
        "task_weights": task_weights,
        "optimizer": optimizer,
        "meta_optimizer": torch.optim.Adam([task_weights.meta_weights], lr=cfg.autol_lr),
        "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs),
        "forward_model": torch.compile(model) if cfg.compile else model,
        "domains": domains,
        "primary_task": domains.index(cfg.primary_domain),
    }


def epoch_line(record: dict, epochs: int, primary_domain: int) -> str:
    r = record
    lambdas = {int(k.removeprefix("lambda_")): v for k, v in r.items() if k.startswith("lambda_")}
    largest = sorted((d for d in lambdas if d != primary_domain), key=lambdas.get, reverse=True)[:3]
    meta = f"| meta pri {r['meta_primary_loss']:.4f} " if "meta_primary_loss" in r else ""
    return (
        f"epoch {r['epoch']:3d}/{epochs} "
        f"| train pri {r['train_primary_loss']:.4f} {100 * r['train_primary_acc']:5.2f}% "
        f"all {r['train_mean_loss']:.4f} "
        f"{meta}| test pri {r['test_primary_loss']:.4f} {100 * r['test_primary_acc']:5.2f}% "
        f"| lambda pri {lambdas[primary_domain]:.3f} top "
        + " ".join(f"{d}:{lambdas[d]:.3f}" for d in largest)
        + f" | {r['seconds']:.1f}s"
    )


# ---------------------------------------------------------------------------------------------
# Settings: checks, run names, published figures


def check_config(cfg: Config) -> Config:
    """Refuse impossible settings before anything runs, a setting of another weighting among them; return the
    config to run, the data's defaults resolved."""
    defaults, only_with = Config(task=cfg.task), experiment.only_with
    only_with(cfg, "--weighting dwa", cfg.weighting == "dwa", defaults, "dwa_temperature")
    only_with(cfg, "--weighting uncert", cfg.weighting == "uncert", defaults, "uncert_init")
    only_with(cfg, "--weighting autol", cfg.weighting == "autol", defaults, "autol_init", "autol_lr", "meta_grad")
    fd = cfg.weighting == "autol" and cfg.meta_grad == "finite-difference"
    only_with(cfg, "--meta-grad finite-difference", fd, defaults, "fd_step")
    cfg = experiment.check_data(
        cfg, "autol", backbones=("vgg16", "resnet18", "resnet50"),
        backbones_because="vgg16 is the authors' MTLVGG16; the ResNets carry one linear head per task",
        cifar100_only="its tasks are CIFAR-100's 20 superclasses",
    )  # fmt: skip
    require(
        cfg,
        at_least_1=("epochs", "batch_size"),
        at_least_0=("weight_decay",),
        positive=("lr", "dwa_temperature", "autol_lr", "fd_step"),
        fraction=("momentum",),
    )
    try:
        others = () if cfg.aux_domains == "all" else aux_domain_list(cfg.aux_domains)
    except ValueError:
        others = (-1,)
    if not all(0 <= d < NUM_DOMAINS for d in [*others, cfg.primary_domain]):
        raise UsageError(
            f"{setting(cfg, 'primary_domain')} and {setting(cfg, 'aux_domains')}: superclasses are 0-19, the others "
            "all or a list such as 0-9 or 0,3,5"
        )
    if cfg.primary_domain in others or len(set(others)) != len(others):
        raise UsageError(f"{setting(cfg, 'aux_domains')}: each once, and not {setting(cfg, 'primary_domain')}")
    if not 0 <= cfg.dev_fraction < 1:
        raise UsageError(f"{setting(cfg, 'dev_fraction', with_value=False)} must be in [0, 1) (got {cfg.dev_fraction})")
    return cfg


def run_name_stem(cfg: Config) -> str:
    method = f"autol-{cfg.meta_grad}" if cfg.weighting == "autol" else cfg.weighting
    others = "" if cfg.aux_domains == "all" else f"-aux{cfg.aux_domains.replace(',', '_')}"
    task = "maoal-" if cfg.task == "maoal-domains" else ""
    return f"autol-{method}-{task}domain{cfg.primary_domain}{others}-seed{cfg.seed}"


def paper_settings(cfg: Config) -> dict:
    """The authors' values of the settings that change the result and are not in run_name_stem.

    A fixed record, not Config's defaults: a run whose settings differ gets a hash of them in its name."""
    paper = {"batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "renormalize": True}
    paper["dev_fraction"] = TASK_DEFAULTS[cfg.task]["dev_fraction"]
    paper |= {
        "dwa": {"dwa_temperature": 2.0},
        "uncert": {"uncert_init": -0.7},
        "autol": {"autol_init": 0.1, "autol_lr": 3e-4},
        "equal": {},
    }[cfg.weighting]
    if cfg.weighting == "autol" and cfg.meta_grad == "finite-difference":
        paper["fd_step"] = 0.01
    return paper


def derived_settings(cfg: Config) -> dict:
    """Values computed from the flags, stored beside them in metrics.json."""
    domains = task_domains(cfg)
    return {"task_domains": list(domains), "primary_classes": list(domain_classes(cfg.primary_domain))}


def published_accuracy(cfg: Config) -> dict[str, float]:
    """Published test accuracy (%) for this configuration, where one could be read: none (unpublished_because)."""
    return {}


def unpublished_because(cfg: Config) -> str:
    if cfg.task == "maoal-domains":
        return "no published figure of Auto-Lambda on the MAOAL authors' CIFAR-100/20 task is entered in this script"
    return (
        "the Auto-Lambda paper's CIFAR-100 figures (Liu et al., TMLR 2022, arXiv 2202.03091) are not yet entered in "
        "this script; its authors' repository publishes NYUv2 figures only"
    )


# Copied from model_vgg_maoal.py
def dev_quotas(class_counts: np.ndarray, dev_size: int) -> np.ndarray:
    """Images per class in a developing set of dev_size, stratified: each class's share of dev_size, rounded by
    largest remainder (ties to the lower class) so that they sum to dev_size."""
    shares = dev_size * class_counts / class_counts.sum()
    quotas = np.floor(shares).astype(np.int64)
    quotas[np.argsort(quotas - shares, kind="stable")[: dev_size - quotas.sum()]] += 1
    return quotas


def held_out(primary_set, cfg: Config) -> np.ndarray:
    """Indices of --dev-fraction of the primary domain's training images, stratified by class and drawn from --seed
    as model_vgg_maoal.py draws its developing set: the same images for the same seed."""
    target = domain_targets(primary_set.labels).numpy()
    counts = np.bincount(target, minlength=DOMAIN_CLASSES)
    quotas = dev_quotas(counts, max(1, round(cfg.dev_fraction * len(target))))
    if ((quotas >= counts) & (counts > 0)).any():
        raise UsageError(f"{setting(cfg, 'dev_fraction')} would hold out every training image of a class")
    rng = np.random.default_rng(cfg.seed)
    chosen = [rng.choice(np.flatnonzero(target == c), size=q, replace=False) for c, q in enumerate(quotas) if q]
    return np.sort(np.concatenate(chosen))


def split_domains(train_set, test_set, cfg: Config) -> tuple:
    """(the primary domain's training images, its test images, no developing set, the other tasks' training images
    in task order and, autol, the primary domain's training images again: the meta batches' second shuffle) for
    run.loaders (the authors' CIFAR100MTL, lorenmt/auto-lambda create_dataset.py)."""
    domains = task_domains(cfg)
    for name, data in (("training", train_set), ("test", test_set)):
        missing = [d for d in domains if not len(domain_indices(data.labels, d))]
        if missing and (name == "training" or cfg.primary_domain in missing):
            raise UsageError(f"superclass {missing[0]} has no {name} images in this dataset")
    own = {d: train_set.subset(domain_indices(train_set.labels, d)) for d in domains}
    if cfg.dev_fraction:  # held out and not used: the images the other rows of MAOAL's table train on
        own[cfg.primary_domain] = own[cfg.primary_domain].split(held_out(own[cfg.primary_domain], cfg))[0]
    others = [own[d] for d in domains if d != cfg.primary_domain]
    meta = [own[cfg.primary_domain]] if cfg.weighting == "autol" else []
    primary_test = test_set.subset(domain_indices(test_set.labels, cfg.primary_domain))
    return own[cfg.primary_domain], primary_test, None, others + meta


# ---------------------------------------------------------------------------------------------
# The run

SAVED = ("model", "task_weights", "optimizer", "meta_optimizer", "scheduler")  # what checkpoint.pt holds


def main(argv: list[str] | None = None) -> None:
    """Parse the flags into Config, open the run, load the data (split into the domains), build, resume; then each
    epoch train (autol: with its meta step before every training step), evaluate, step the schedule, save and
    print; then the summary. A refusal is one line and exit code 2."""
    with experiment.Run(argv) as run:
        cfg = check_config(run.parse(Config, __doc__))
        run.open(
            "autol", cfg, run_name_stem(cfg), paper_settings(cfg), derived_settings(cfg),
            published_accuracy(cfg), unpublished_because(cfg),
        )  # fmt: skip
        data = run.loaders(*split_domains(*run.datasets(), cfg))
        state = build(cfg, run.device)
        saved = {name: state[name] for name in SAVED}
        run.resume(saved)
        graphs = StepGraphs([state["optimizer"]], run.device, cfg.cuda_graphs)
        if cfg.smoke:
            run.smoke_baseline(evaluate(state, graphs, data.test, cfg, run.device))
        for epoch in run.epochs():
            rates = {"lr": state["optimizer"].param_groups[0]["lr"]}
            metrics = train_epoch(state, data, cfg, run.device, epoch)
            metrics |= evaluate(state, graphs, data.test, cfg, run.device)
            state["scheduler"].step()
            record = run.save(saved, metrics | rates)
            run.say(epoch_line(record, cfg.epochs, cfg.primary_domain))
        run.finish()


if __name__ == "__main__":
    main()
