"""MAOAL: module-aware auxiliary weights learned by implicit differentiation (Chen et al., NeurIPS 2022),
on the CIFAR-100 hierarchy with VGG-16, with the authors' baselines.

A multi-task VGG-16 learns the primary task (default: the 20 CIFAR-100 superclasses) with the human-made
finer labels as auxiliary task (default: the 100 fine classes), as Human does; but in each of the trunk's
five convolution blocks b the auxiliary gradient is scaled by its own weight lambda_b. lambda is learned
by bi-level optimisation: every --meta-every steps it takes a step along the implicit-function
hypergradient of the primary loss on a developing set held out of the training set (a truncated Neumann
series, as in AuxiLearn). --mode equal, gcs (by its paper's rule: one cosine per auxiliary loss over the whole
trunk), aux (AuxiLearn's loss combiner) and single are the authors' baselines on the same images; gcs-block
decides per block. --task domains is the authors' own CIFAR-100/20 experiment (ResNet-18, ten auxiliary tasks).

    python model_vgg_maoal.py                                  # MAOAL: primary 20, auxiliary 100, 200 epochs
    python model_vgg_maoal.py --mode equal                     # lambda = 1: Human's loss, same training images
    python model_vgg_maoal.py --mode gcs --primary-level 3 --aux-level 10
    python model_vgg_maoal.py --smoke                          # one-minute install check on CPU
    python model_vgg_maoal.py --task domains                   # the authors' CIFAR-100/20: people, domains 0-9
    python model_vgg_maoal.py --task domains --mode aux        # AuxiLearn's loss combiner on the same task

To change the experiment, edit `Config` below or pass the flag: every field is one, and the two are the same.
main(), at the bottom, holds the run loop; it calls experiment.py for the run machinery (flags, the run folder,
checkpoints, resume). Prints one line per epoch (train and test loss and accuracy, primary and auxiliary; lambda
per block; in maoal mode the developing batches' primary loss and accuracy and the hypergradient's norm) and
writes results/<run-name>/metrics.json and checkpoint.pt after every epoch; --resume continues.
Cost: a maoal or gcs step backpropagates twice (each loss's gradient apart), about 1.7x a Human step; the
hypergradient every --meta-every steps (J = 3) about 22 Human steps: an epoch about 2.8x Human's (CPU, batch 100,
benchmarks/README.md). The authors' Neumann step, alpha = 1, is kept, but on VGG-16 the series diverges: the largest
eigenvalue of dg/dW is of the order of 10^3 (synthetic data at initialisation, batch 50: the hypergradient's norm
grew from 6e3 at J = 1 to 7e9 at J = 3 and overflowed at J = 6), so the clip to norm 10 sets the step's size and the
series' last term its direction; --neumann-alpha 1e-4 converges (norms 0.003, 0.006, 0.010 at J = 1, 3, 6).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import experiment
from create_dataset import CIFAR100, DOMAIN_LABEL, LEVELS, Loaders, domain_classes, domain_indices, level_index
from experiment import (
    FiniteGuard,
    Meter,
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
    setting,
)

CIFAR100_ONLY = "its auxiliary task is the finer level of CIFAR-100's hierarchy, --aux-level"

MODES = ("maoal", "equal", "gcs", "gcs-block", "aux", "single")
TASKS = ("hierarchy", "domains")
MODULES = ("block1", "block2", "block3", "block4", "block5")  # the modules lambda weighs: VGG-16's conv blocks
# ResNet-18's modules as the authors' map_param_to_block cut theirs: the stem (conv1 and its BatchNorm), then
# conv2_x..conv5_x, torchvision's layer1..layer4 (forchchch/MAOAL@4a750de, train.py lines 19-40).
RESNET_MODULES = ("stem", "layer1", "layer2", "layer3", "layer4")
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # the authors' Normalize (forchchch/MAOAL@4a750de, train.py line 469)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# The settings whose paper value depends on --task: None in Config, resolved by Config.__post_init__ (the backbone,
# RunConfig's, by paper_backbone).
TASK_DEFAULTS = {
    "hierarchy": dict(
        batch_size=100, lr=0.01, momentum=0.0, weight_decay=0.0, lr_schedule="step", focal_gamma=2.0,
        meta_every=20, lambda_optimizer="sgd", lambda_lr=1e-3, lambda_weight_decay=0.0, aux_reduction="mean",
    ),
    # forchchch/MAOAL@4a750de: config/params.json (lr 0.1, decay 5e-4, hyper lr 0.01 and decay 5e-4, epochs 200,
    # train_batchsize 32, interval 10, hpolr 1.0, m_ratio 0.05), train.py lines 146, 202 (Adam), 495 (SGD
    # momentum 0.9, CrossEntropyLoss: focal gamma 0).
    "domains": dict(
        batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", focal_gamma=0.0,
        meta_every=10, lambda_optimizer="adam", lambda_lr=1e-2, lambda_weight_decay=5e-4, aux_reduction=None,
    ),
}  # fmt: skip


@dataclass
class Config(RunConfig):
    """The experiment: the paper's settings (edit here or pass the flag). The data and run settings are
    RunConfig's, in experiment.py. A field whose default is None takes its task's value (TASK_DEFAULTS)."""

    primary_level: int | None = option(
        None,
        "hierarchy: primary task on CIFAR-100: number of classes in the hierarchy; default: 20, the superclasses "
        "(other datasets: their classes)",
        choices=(3, 10, 20),
        type=int,
    )
    aux_level: int = option(100, "hierarchy: auxiliary task: a finer level of the hierarchy", choices=(10, 20, 100))
    task: str = option(
        "hierarchy",
        "hierarchy: this project's (primary a level of CIFAR-100's hierarchy, auxiliary a finer one, VGG-16); "
        "domains: the MAOAL authors' CIFAR-100/20 (primary the 5 classes of --target-domain, auxiliary the 5-way "
        "tasks of --aux-domains on their own images, one linear head each, ResNet-18)",
        choices=TASKS,
    )
    target_domain: int = option(14, "domains: the primary task's superclass (14: people, the authors')")
    aux_domains: str = option("0-9", "domains: the auxiliary superclasses, e.g. 0-9 or 0,3,5 (the authors': 0-9)")
    renormalize: bool = option(
        True,
        "domains: normalise the inputs by CIFAR-100's channel means and deviations, as the authors (the loaders' "
        "0.5 and 0.2, undone by an affine map in the network)",
    )
    mode: str = option(
        "maoal",
        "maoal: lambda learned by implicit differentiation; the authors' baselines: equal (lambda = 1), gcs (an "
        "auxiliary loss's gradient added to every module where its cosine with the primary one over all shared "
        "parameters is positive, else nowhere: Du et al. 2018 and the authors' code), gcs-block (this project's "
        "earlier rule: the cosine and the decision per module), aux (AuxiLearn: a monotone non-linear combiner of "
        "the losses learned by implicit differentiation), single (lambda = 0)",
        choices=MODES,
    )
    epochs: int = option(200, "training epochs")
    batch_size: int | None = option(
        None, "images per batch, train, developing set and test (default: 100 hierarchy, 32 domains)", type=int
    )
    lr: float | None = option(None, "SGD learning rate (default: 0.01 hierarchy, 0.1 domains)", type=float)
    momentum: float | None = option(None, "SGD momentum (default: 0 hierarchy, 0.9 domains)", type=float)
    weight_decay: float | None = option(None, "SGD weight decay (default: 0 hierarchy, 5e-4 domains)", type=float)
    lr_schedule: str | None = option(
        None,
        "step (x --lr-gamma every --lr-step epochs) or cosine (to 0 over --epochs) (default: step hierarchy, "
        "cosine domains)",
        choices=("step", "cosine"),
    )
    lr_step: int = option(50, "step schedule: the learning rate is multiplied by --lr-gamma every this many epochs")
    lr_gamma: float = option(0.5, "StepLR factor")
    focal_gamma: float | None = option(
        None, "focal loss exponent; 0 is cross-entropy (default: 2 hierarchy, the paper's; 0 domains)", type=float
    )
    dev_size: int = option(
        500,
        "hierarchy: developing set: training images held out (stratified by primary class, drawn from --seed), "
        "every mode",
    )
    dev_fraction: float = option(
        0.05, "domains: developing set: this fraction of the target domain's training images (the authors' m_ratio)"
    )
    aux_reduction: str | None = option(
        None,
        "domains: the auxiliary losses enter the step as their mean or their sum (default: the authors' per mode: "
        "mean in maoal, lambda scaled by 1/K; sum in equal, gcs, gcs-block)",
        choices=("mean", "sum"),
    )
    meta_every: int | None = option(
        None,
        "maoal, aux: a hypergradient step after every this many training steps (default: 20 hierarchy, 10 domains)",
        type=int,
    )
    neumann_terms: int = option(
        3,
        "maoal, aux: J, the number of Hessian-vector products of the truncated Neumann series (the authors' "
        "truncate_iter)",
    )
    neumann_alpha: float = option(
        1.0,
        "maoal: alpha, the Neumann series' step: H^-1 ~ alpha * sum_j=0..J (I - alpha H)^j, H = dg/dW "
        "(the authors': 1)",
    )
    authors_neumann_sum: bool = option(
        True,
        "maoal, aux: the hypergradient as the authors' (AuxiLearn's) code: the Neumann sum without the factor alpha, "
        "1/alpha times the implicit gradient (the same at alpha = 1)",
    )
    lambda_activation: str = option(
        "softplus",
        "maoal: lambda = softplus(rho) (this project's), or relu(rho) (the authors': an entry that reaches 0 has "
        "zero gradient and stays off)",
        choices=("softplus", "relu"),
    )
    lambda_optimizer: str | None = option(
        None, "maoal: sgd or adam for rho (default: sgd hierarchy, adam domains)", choices=("sgd", "adam")
    )
    lambda_lr: float | None = option(
        None, "maoal: learning rate of rho (default: 1e-3 hierarchy, 1e-2 domains)", type=float
    )
    lambda_momentum: float = option(0.9, "maoal: SGD momentum of rho (sgd only)")
    lambda_weight_decay: float | None = option(
        None, "maoal: weight decay of rho (default: 0 hierarchy, 5e-4 domains)", type=float
    )
    hypergrad_clip: float = option(10.0, "maoal: the hypergradient's norm is clipped to this (the authors: 10)")
    combiner_hidden: str = option("5,5", "aux: hidden layer widths of the loss combiner (the authors': 5,5)")
    combiner_lr: float = option(1e-3, "aux: SGD learning rate of the loss combiner (the authors': 1e-3)")
    combiner_momentum: float = option(0.9, "aux: SGD momentum of the loss combiner")
    combiner_weight_decay: float = option(5e-4, "aux: SGD weight decay of the loss combiner")
    combiner_alpha: float = option(1e-4, "aux: the Neumann series' step alpha for the combiner (the authors' hpo_lr)")

    def __post_init__(self):
        for name, value in TASK_DEFAULTS.get(self.task, TASK_DEFAULTS["hierarchy"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()  # the backbone: the task's paper_backbone

    @property
    def paper_backbone(self) -> str:
        """The authors' network for the task: ResNet-18 on their CIFAR-100/20, VGG-16 (Human's) on the hierarchy."""
        return "resnet18" if self.task == "domains" else "vgg16"


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

    def auxiliary_heads(self) -> list[nn.Module]:
        return [self.classifier2]


class ModuleWeights(nn.Module):
    """lambda, one entry per (auxiliary loss, module), as softplus(rho) or relu(rho); rho starts where lambda = 1.

    softplus by default, not the authors' ReLU: a ReLU entry that goes below zero has zero gradient and stays off
    for good."""

    def __init__(self, num_auxiliary_losses: int, num_modules: int, activation: str = "softplus"):
        super().__init__()
        self.activation = activation
        start = math.log(math.expm1(1.0)) if activation == "softplus" else 1.0
        self.rho = nn.Parameter(torch.full((num_auxiliary_losses, num_modules), start))

    def forward(self) -> torch.Tensor:
        return F.softplus(self.rho) if self.activation == "softplus" else F.relu(self.rho)


class DomainNet(Trunk):
    """The multi-domain task's network: the trunk shared by every domain, one linear head per domain on its
    features (the authors' MTL_model): `classifier1` the target's, `auxiliary[k]` the k-th auxiliary domain's.
    forward returns every head's logits; a batch of domain k is scored by its own head."""

    def __init__(self, num_classes: int, num_auxiliary: int, backbone: nn.Module | None, renormalize: bool):
        super().__init__(backbone)
        self.classifier1 = nn.Linear(self.num_features, num_classes)  # PyTorch's default initialisation, as theirs
        self.auxiliary = nn.ModuleList(nn.Linear(self.num_features, num_classes) for _ in range(num_auxiliary))
        if backbone is None:
            init_weights(self, nn.init.xavier_uniform_)
        # The loaders normalise by (0.5, 0.2); x * scale + shift normalises by CIFAR-100's statistics instead
        # (an affine map of the same pixels, zero padding included). Not saved: constants.
        scale = torch.tensor([0.2 / s for s in CIFAR100_STD]).view(1, 3, 1, 1)
        shift = torch.tensor([(0.5 - m) / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)]).view(1, 3, 1, 1)
        self.renormalize = renormalize
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalize:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        return super().features(x)

    def forward(self, x: torch.Tensor, detach_auxiliary: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.features(x)
        aux_features = features.detach() if detach_auxiliary else features
        return self.classifier1(features), [h(aux_features) for h in self.auxiliary]

    def auxiliary_heads(self) -> list[nn.Module]:
        return list(self.auxiliary)


class LossCombiner(nn.Module):
    """AuxiLearn's monotone non-linear loss combiner (Navon et al., ICLR 2021; MonoNonlinearHyperNet in
    AvivNavon/AuxiLearn and forchchch/MAOAL@4a750de AuxLearn/hypernet.py lines 210-292), written here:
    losses (primary first) -> Linear, softplus, ..., Linear(., 1) without bias, averaged, plus the primary loss.
    Every weight is weight-normalised, w = g * v / |v| row by row (g starts at |v|, v uniform in [0, 1], biases 0);
    clamp() keeps v and g at 0 or more after each step, so the output never decreases in any loss."""

    def __init__(self, num_losses: int, hidden: tuple[int, ...] = (5, 5)):
        super().__init__()
        dims = [num_losses, *hidden, 1]
        self.v = nn.ParameterList()
        self.g = nn.ParameterList()
        self.b = nn.ParameterList()
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:])):
            v = torch.empty(d_out, d_in).uniform_(0.0, 1.0)
            self.v.append(nn.Parameter(v))
            self.g.append(nn.Parameter(v.norm(dim=1, keepdim=True)))
            if i < len(hidden):
                self.b.append(nn.Parameter(torch.zeros(d_out)))

    def weights(self) -> list[torch.Tensor]:
        return [g * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12) for v, g in zip(self.v, self.g)]

    def forward(self, losses: torch.Tensor, primary_loss: torch.Tensor) -> torch.Tensor:
        x = losses.reshape(1, -1)
        weights = self.weights()
        for i, w in enumerate(weights):
            x = x @ w.T
            if i < len(self.b):
                x = F.softplus(x + self.b[i])
        return x.mean() + primary_loss

    @torch.no_grad()
    def clamp(self) -> None:
        for p in chain(self.v, self.g):
            p.clamp_(min=0)


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


def class_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal loss against class labels; gamma 0 is cross-entropy (the authors' loss on the domains task)."""
    return focal_loss(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype), gamma)


# ---------------------------------------------------------------------------------------------
# The method's mathematics
#
# Lower level: the network's parameters W follow g(W, lambda), for a trunk tensor in module b
#     g = grad L_pri + c * sum_k lambda_kb * grad L_k,
# each head its own loss's gradient (auxiliary heads times c), c = 1/K for the mean of K auxiliary losses, 1 for
# their sum. Upper level: lambda minimises L_dev(W*(lambda)), the primary loss on the developing set at the fixed
# point g(W*, lambda) = 0. By the implicit function theorem
#     d L_dev / d lambda = -(dg/dlambda)^T (dg/dW)^-T dL_dev/dW,
# the inverse applied by a truncated Neumann series, each term one vector-Jacobian product of g.
# AuxiLearn (mode aux) is the same upper level with g = grad of its combiner's loss and the combiner's weights
# for lambda.


def module_names(model: nn.Module) -> tuple[str, ...]:
    """The modules lambda weighs: VGG-16's five blocks, or a ResNet's stem and four layers."""
    return MODULES if model.backbone is None else RESNET_MODULES


def trunk_modules(model: nn.Module) -> list[int]:
    """The module (an index into module_names(model)) of each of model.shared_parameters(), in that order."""
    if model.backbone is None:
        return [MODULES.index(name.split(".")[0]) for name, _ in model.named_parameters() if name.startswith("block")]
    modules = []
    for name, _ in model.named_parameters():
        if name.startswith("backbone."):
            part = name.split(".")[1]
            modules.append(RESNET_MODULES.index(part) if part in RESNET_MODULES else 0)  # conv1, bn1: the stem
    return modules


def weighted_gradients(
    primary_grads: list[torch.Tensor], aux_grads: list[torch.Tensor], weights: torch.Tensor, modules: list[int]
) -> list[torch.Tensor]:
    """grad L_pri + weights[b] * grad L_aux for each trunk tensor, b its module."""
    return [g + weights[b] * a for g, a, b in zip(primary_grads, aux_grads, modules)]


def combined_gradients(
    primary_grads: list[torch.Tensor], aux_grads: list[list[torch.Tensor]], weights: torch.Tensor, modules: list[int]
) -> list[torch.Tensor]:
    """grad L_pri + sum_k weights[k, b] * grad L_k for each trunk tensor (weights: (K, modules)); K = 1 is
    weighted_gradients."""
    grads = list(primary_grads)
    for k, aux in enumerate(aux_grads):
        grads = weighted_gradients(grads, aux, weights[k], modules)
    return grads


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


def gcs_gates(
    primary_grads: list[torch.Tensor],
    aux_grads: list[list[torch.Tensor]],
    modules: list[int],
    num_modules: int,
    per_block: bool = False,
) -> torch.Tensor:
    """The gradient-similarity gates, (K, modules) of 0 and 1. The paper's rule (Du et al. 2018; the authors'
    weighting_way.py GradCosine, forchchch/MAOAL@4a750de lines 30-51): one cosine per auxiliary loss over all
    shared parameters, its gradient added in every module if positive, else in none. per_block (gcs-block):
    each module's own cosine decides for that module."""
    gates = []
    for aux in aux_grads:
        if per_block:
            cosines = module_cosines(primary_grads, aux, modules, num_modules)
        else:
            cosines = module_cosines(primary_grads, aux, [0] * len(modules), 1).expand(num_modules)
        gates.append((cosines > 0).to(primary_grads[0].dtype))
    return torch.stack(gates)


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
    """The primary and the auxiliary focal loss of one batch (the hierarchy task)."""
    primary, auxiliary = labels[:, level_index(cfg.primary_level)], labels[:, level_index(cfg.aux_level)]
    primary_loss = focal_loss(primary_logits, F.one_hot(primary, cfg.primary_level).float(), cfg.focal_gamma)
    aux_loss = focal_loss(aux_logits, F.one_hot(auxiliary, cfg.aux_level).float(), cfg.focal_gamma)
    return primary_loss, aux_loss


def domain_targets(labels: torch.Tensor) -> torch.Tensor:
    """A domain task's labels (0-4) from (N, 4) hierarchy labels: the fine labels renumbered within their domain."""
    return torch.as_tensor(DOMAIN_LABEL, device=labels.device)[labels[:, level_index(100)]]


def aux_scale(cfg: Config, num_auxiliary: int) -> float:
    """c: each auxiliary loss's weight in the step, 1/K for their mean, 1 for their sum."""
    return 1.0 / num_auxiliary if cfg.aux_reduction == "mean" and num_auxiliary > 1 else 1.0


def lower_level_gradient(
    model: nn.Module,
    primary_loss: torch.Tensor,
    aux_losses: list[torch.Tensor],
    weights: torch.Tensor | None,
    create_graph: bool = False,
    per_block: bool = False,
    scale: float = 1.0,
) -> tuple[list[nn.Parameter], list[torch.Tensor], torch.Tensor]:
    """g for every parameter (trunk, primary head, auxiliary heads: model.parameters()' order) and the weights it
    used, (K, modules): `weights` (lambda), or with None the gcs gates (gcs_gates, per_block for gcs-block).
    `scale` is c, the auxiliary losses' common factor (1/K for their mean)."""
    trunk, modules = model.shared_parameters(), trunk_modules(model)
    primary_head = list(model.classifier1.parameters())
    aux_heads = [list(h.parameters()) for h in model.auxiliary_heads()]
    primary_grads = torch.autograd.grad(
        primary_loss, trunk + primary_head, retain_graph=True, create_graph=create_graph
    )
    n, last = len(trunk), len(aux_losses) - 1
    aux_grads = [
        torch.autograd.grad(loss, trunk + aux_head, retain_graph=create_graph or k < last, create_graph=create_graph)
        for k, (loss, aux_head) in enumerate(zip(aux_losses, aux_heads))
    ]
    num_modules = len(module_names(model))
    if weights is None:
        weights = gcs_gates(list(primary_grads[:n]), [list(a[:n]) for a in aux_grads], modules, num_modules, per_block)
    trunk_weights = weights * scale if scale != 1.0 else weights
    trunk_grads = combined_gradients(list(primary_grads[:n]), [list(a[:n]) for a in aux_grads], trunk_weights, modules)
    head_grads = [g * scale if scale != 1.0 else g for a in aux_grads for g in a[n:]]
    params = trunk + primary_head + [p for h in aux_heads for p in h]
    return params, trunk_grads + list(primary_grads[n:]) + head_grads, weights


def step_losses(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: Config, forward=None, detach=False
) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """The primary loss and the auxiliary losses of one step, and the step's accuracies (tensors). Hierarchy: one
    batch, both heads; domains: the target batch on its head, auxiliary batch k on head k. `forward` is the
    network as a function (default: model)."""
    forward = forward or model
    images, labels = batches[0]
    if cfg.task == "hierarchy":
        primary_logits, aux_logits = forward(images, detach_auxiliary=detach)
        primary_loss, aux_loss = task_losses(primary_logits, aux_logits, labels, cfg)
        accs = {
            "primary": (primary_logits.argmax(1) == labels[:, level_index(cfg.primary_level)]).float().mean(),
            "aux": (aux_logits.argmax(1) == labels[:, level_index(cfg.aux_level)]).float().mean(),
        }
        return primary_loss, [aux_loss], accs
    primary_logits, _ = forward(images)
    target = domain_targets(labels)
    primary_loss = class_loss(primary_logits, target, cfg.focal_gamma)
    aux_losses, aux_accs = [], []
    for k, (aux_images, aux_labels) in enumerate(batches[1:]):
        logits = forward(aux_images, detach_auxiliary=detach)[1][k]
        aux_target = domain_targets(aux_labels)
        aux_losses.append(class_loss(logits, aux_target, cfg.focal_gamma))
        aux_accs.append((logits.argmax(1) == aux_target).float().mean())
    accs = {"primary": (primary_logits.argmax(1) == target).float().mean(), "aux": torch.stack(aux_accs).mean()}
    return primary_loss, aux_losses, accs


def functional_forward(model: nn.Module, params: dict):
    """The network as a function of `params`, on throw-away copies of the running statistics: the upper level
    must not change the network it judges."""

    def forward(images: torch.Tensor, detach_auxiliary: bool = False):
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        return functional_call(model, (params, buffers), (images,), {"detach_auxiliary": detach_auxiliary})

    return forward


def dev_loss_and_acc(forward, dev_images, dev_labels, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    dev_logits = forward(dev_images)[0]
    target = dev_labels[:, level_index(cfg.primary_level)] if cfg.task == "hierarchy" else domain_targets(dev_labels)
    dev_loss = class_loss(dev_logits, target, cfg.focal_gamma)
    with torch.no_grad():
        dev_acc = (dev_logits.argmax(1) == target).float().mean()
    return dev_loss, dev_acc


def hypergradient(
    model: nn.Module,
    module_weights: ModuleWeights,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    dev_images: torch.Tensor,
    dev_labels: torch.Tensor,
    cfg: Config,
    aux_batches: list | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """d L_dev / d rho at the current W, g on the training batch (and, domains, the auxiliary batches); and the
    developing batch's primary loss and accuracy. BatchNorm uses batch statistics, as in training; running
    statistics, parameters and .grad stay."""
    forward = functional_forward(model, dict(model.named_parameters()))
    dev_loss, dev_acc = dev_loss_and_acc(forward, dev_images, dev_labels, cfg)
    batches = [(train_images, train_labels), *(aux_batches or [])]
    primary_loss, aux_losses, _ = step_losses(model, batches, cfg, forward)
    weights = module_weights()
    params_in_order, train_grads, _ = lower_level_gradient(
        model, primary_loss, aux_losses, weights, create_graph=True, scale=aux_scale(cfg, len(aux_losses))
    )
    dev_grads = torch.autograd.grad(dev_loss, params_in_order, materialize_grads=True)
    grads = implicit_hypergradient(
        dev_grads, train_grads, params_in_order, list(module_weights.parameters()), cfg.neumann_alpha, cfg.neumann_terms
    )
    if cfg.authors_neumann_sum and cfg.neumann_alpha != 1.0:
        grads = [g / cfg.neumann_alpha for g in grads]
    return grads, dev_loss.detach(), dev_acc


def combiner_hypergradient(
    model: nn.Module, combiner: LossCombiner, batches: list, dev_images, dev_labels, cfg: Config
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """AuxiLearn's upper level: d L_dev / d (combiner's parameters), g = grad of the combined loss w.r.t. every
    parameter of the network, on the training batches; the developing batch's primary loss and accuracy."""
    params = dict(model.named_parameters())
    forward = functional_forward(model, params)
    dev_loss, dev_acc = dev_loss_and_acc(forward, dev_images, dev_labels, cfg)
    primary_loss, aux_losses, _ = step_losses(model, batches, cfg, forward)
    train_loss = combiner(torch.stack([primary_loss, *aux_losses]), primary_loss)
    weights = list(params.values())
    train_grads = torch.autograd.grad(train_loss, weights, create_graph=True, materialize_grads=True)
    dev_grads = torch.autograd.grad(dev_loss, weights, materialize_grads=True)
    grads = implicit_hypergradient(
        dev_grads, list(train_grads), weights, list(combiner.parameters()), cfg.combiner_alpha, cfg.neumann_terms
    )
    if cfg.authors_neumann_sum:
        grads = [g / cfg.combiner_alpha for g in grads]
    return grads, dev_loss.detach(), dev_acc


# ---------------------------------------------------------------------------------------------
# Training and evaluation steps


def train_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config, aux_batches=None) -> dict:
    """One step: an SGD step on g (lambda_kb-weighted auxiliary gradient in module b, each head its own loss), or
    in aux mode on the combiner's loss. Hierarchy: one batch; domains: the target's batch and `aux_batches`, one
    per auxiliary domain. Returns metrics as tensors, among them the weights lambda used per module (domains:
    their mean over the auxiliary losses)."""
    model, optimizer = state["model"], state["optimizer"]
    one_backward = cfg.mode in ("equal", "single")
    batches = [(images, labels), *(aux_batches or [])]
    # maoal and gcs take several gradients from one graph; a torch.compile'd network's backward may run only once
    # (donated buffers), so they run the eager network: same arithmetic.
    network = state["forward_model"] if one_backward else model

    def forward(x: torch.Tensor, detach_auxiliary: bool = False):
        with autocast(cfg, images.device):  # the network only: the losses in float32 or wider
            return network(x, detach_auxiliary=detach_auxiliary)

    primary_loss, aux_losses, accs = step_losses(model, batches, cfg, forward, detach=cfg.mode == "single")
    scale = aux_scale(cfg, len(aux_losses))
    aux_total = aux_losses[0] if len(aux_losses) == 1 else torch.stack(aux_losses).sum() * scale
    out = {
        "loss": primary_loss + aux_total,
        "train_primary_loss": primary_loss,
        "train_primary_acc": accs["primary"],
        "train_aux_loss": torch.stack(aux_losses).mean() if len(aux_losses) > 1 else aux_losses[0],
        "train_aux_acc": accs["aux"],
    }
    optimizer.zero_grad(set_to_none=True)
    num_modules = len(module_names(model))
    if one_backward:
        # lambda = 1 in every module is Human's step; lambda = 0 (the trunk detached from the auxiliary head) is
        # Single's, the auxiliary head still learning on the features.
        out["loss"].backward()
        weights = torch.full((len(aux_losses), num_modules), float(cfg.mode == "equal"), device=images.device)
    elif cfg.mode == "aux":
        combiner = state["combiner"]
        out["loss"] = combiner(torch.stack([primary_loss, *aux_losses]), primary_loss)
        out["loss"].backward(inputs=list(model.parameters()))
        weights = torch.full((len(aux_losses), num_modules), float("nan"), device=images.device)
    else:
        given = state["module_weights"]().detach() if cfg.mode == "maoal" else None
        params, grads, weights = lower_level_gradient(
            model, primary_loss, aux_losses, given, per_block=cfg.mode == "gcs-block", scale=scale
        )
        for p, g in zip(params, grads):
            p.grad = g
    optimizer.step()
    if cfg.mode != "aux":
        out.update({f"lambda_{name}": weight for name, weight in zip(module_names(model), weights.mean(0))})
    return out


def meta_step(
    state: dict,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    dev_images: torch.Tensor,
    dev_labels: torch.Tensor,
    cfg: Config,
    aux_batches: list | None = None,
) -> dict:
    """The upper level: a step of rho (lambda = softplus(rho)), or in aux mode of the combiner (then clamped),
    along the implicit hypergradient, its norm clipped to --hypergrad-clip. Always fp32, also with --amp. Returns
    the developing batch's primary loss and accuracy and the hypergradient's norm before clipping (tensors)."""
    if cfg.mode == "aux":
        hyper = state["combiner"]
        grads, dev_loss, dev_acc = combiner_hypergradient(
            state["model"], hyper, [(train_images, train_labels), *(aux_batches or [])], dev_images, dev_labels, cfg
        )
        optimizer = state["combiner_optimizer"]
    else:
        hyper = state["module_weights"]
        grads, dev_loss, dev_acc = hypergradient(
            state["model"], hyper, train_images, train_labels, dev_images, dev_labels, cfg, aux_batches
        )
        optimizer = state["lambda_optimizer"]
    for p, g in zip(hyper.parameters(), grads):
        p.grad = g
    norm = torch.nn.utils.clip_grad_norm_(list(hyper.parameters()), cfg.hypergrad_clip)
    optimizer.step()
    if cfg.mode == "aux":
        hyper.clamp()
    return {"dev_primary_loss": dev_loss, "dev_primary_acc": dev_acc, "hypergrad_norm": norm}


def endless_batches(loader, cfg: Config, device: torch.device):
    """A loader's batches, pass after pass (each pass shuffled anew by the loader's generator)."""
    while True:
        for _, images, labels in batches(loader, cfg, device, phase=None):  # between training steps: no line
            yield images, labels


def train_epoch(
    state: dict, graphs: StepGraphs, data: Loaders, cfg: Config, device: torch.device, epoch: int
) -> dict[str, float]:
    """One pass over the (target's) train set, data.train; in maoal and aux mode, an upper-level step after every
    --meta-every steps (counted from the epoch's start) on the next batch of data.dev and the training batches just
    used. Domains: each step also takes the next batch of every auxiliary domain, data.auxiliary (their passes
    restart each epoch, and when one runs out, as the authors'); those steps run eagerly, not as CUDA graphs."""
    meter = Meter()
    guard, meta_guard = FiniteGuard(device), FiniteGuard(device)
    state["model"].train()
    train = functools.partial(train_step, state, cfg=cfg)
    dev = endless_batches(data.dev, cfg, device) if cfg.mode in ("maoal", "aux") else None
    auxiliary = [endless_batches(loader, cfg, device) for loader in data.auxiliary]
    for step, images, labels in batches(data.train, cfg, device):
        aux_batches = [next(a) for a in auxiliary]
        out = train(images, labels, aux_batches=aux_batches) if auxiliary else graphs("train", train, images, labels)
        guard.watch(out.pop("loss"), epoch, "train", step)
        for name in [k for k in out if k.startswith("lambda_")]:
            meter.add(name, out.pop(name), 1)
        for name, value in out.items():
            meter.add(name, value, images.shape[0])
        if dev is not None and (step + 1) % cfg.meta_every == 0:
            dev_images, dev_labels = next(dev)
            # Eager, not a CUDA graph: it needs two batches, and runs once every --meta-every steps.
            stats = meta_step(state, images, labels, dev_images, dev_labels, cfg, aux_batches)
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


def domain_eval_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict:
    """Test metrics of one batch of the domains task, as tensors: the target domain's test images, its head only."""
    with autocast(cfg, images.device):
        primary_logits = state["forward_model"](images)[0]
    target = domain_targets(labels)
    return {
        "test_primary_loss": class_loss(primary_logits, target, cfg.focal_gamma),
        "test_primary_acc": (primary_logits.argmax(1) == target).float().mean(),
    }


@torch.inference_mode()
def evaluate(state: dict, graphs: StepGraphs, loader, cfg: Config, device: torch.device) -> dict[str, float]:
    """eval_step (domains: domain_eval_step) over the test set, averaged per image; the network back in training
    mode."""
    meter = Meter()
    state["model"].eval()
    step = functools.partial(domain_eval_step if cfg.task == "domains" else eval_step, state, cfg=cfg)
    for _, images, labels in batches(loader, cfg, device, phase="test"):
        for name, value in graphs("evaluate", step, images, labels).items():
            meter.add(name, value, images.shape[0])
    state["model"].train()
    return meter.means()


def aux_domain_list(text: str) -> tuple[int, ...]:
    """--aux-domains as superclass numbers: '0-9' or '0,3,5' (ranges and single ones, comma-separated)."""
    domains = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        domains += list(range(int(first), int(last or first) + 1))
    return tuple(domains)


def make_network(cfg: Config) -> nn.Module:
    if cfg.task == "hierarchy":
        return VGG16(cfg.primary_level, cfg.aux_level, make_backbone(cfg))
    return DomainNet(5, len(aux_domain_list(cfg.aux_domains)), make_backbone(cfg), cfg.renormalize)


def build(cfg: Config, device: torch.device) -> dict:
    """Network, lambda, the loss combiner, their optimisers and the network's scheduler; forward_model is the
    network as the steps run it (compiled with --compile), the others are saved in the checkpoint. lambda
    (ModuleWeights) is there in every mode, only maoal mode uses and updates it; the combiner only in aux mode."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = make_network(cfg).to(device, memory_format=memory_format)
    if cfg.momentum or cfg.weight_decay:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    num_aux = 1 if cfg.task == "hierarchy" else len(aux_domain_list(cfg.aux_domains))
    module_weights = ModuleWeights(num_aux, len(module_names(model)), cfg.lambda_activation).to(device)
    if cfg.lambda_optimizer == "adam":
        lambda_optimizer = torch.optim.Adam(
            module_weights.parameters(), lr=cfg.lambda_lr, weight_decay=cfg.lambda_weight_decay
        )
    else:
        lambda_optimizer = torch.optim.SGD(
            module_weights.parameters(),
            lr=cfg.lambda_lr,
            momentum=cfg.lambda_momentum,
            **({"weight_decay": cfg.lambda_weight_decay} if cfg.lambda_weight_decay else {}),
        )
    if cfg.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, eta_min=0)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    state = {
        "model": model,
        "module_weights": module_weights,
        "optimizer": optimizer,
        "lambda_optimizer": lambda_optimizer,
        "scheduler": scheduler,
        "forward_model": torch.compile(model) if cfg.compile else model,
    }
    if cfg.mode == "aux":
        hidden = tuple(int(h) for h in cfg.combiner_hidden.split(","))
        combiner = LossCombiner(1 + num_aux, hidden).to(device)
        state["combiner"] = combiner
        state["combiner_optimizer"] = torch.optim.SGD(
            combiner.parameters(), lr=cfg.combiner_lr, momentum=cfg.combiner_momentum,
            weight_decay=cfg.combiner_weight_decay,
        )  # fmt: skip
    return state


def epoch_line(record: dict, epochs: int) -> str:
    r = record
    dev = (
        f"| dev pri {r['dev_primary_loss']:.4f} {100 * r['dev_primary_acc']:5.2f}% hypergrad {r['hypergrad_norm']:.3g} "
        if "dev_primary_loss" in r
        else ""
    )
    lambdas = " ".join(f"{r[k]:.3f}" for k in r if k.startswith("lambda_"))
    test_aux = f"aux {r['test_aux_loss']:.4f} {100 * r['test_aux_acc']:5.2f}% " if "test_aux_loss" in r else ""
    return (
        f"epoch {r['epoch']:3d}/{epochs} "
        f"| train pri {r['train_primary_loss']:.4f} {100 * r['train_primary_acc']:5.2f}% "
        f"aux {r['train_aux_loss']:.4f} {100 * r['train_aux_acc']:5.2f}% "
        + (f"| lambda {lambdas} " if lambdas else "")
        + f"{dev}"
        f"| test pri {r['test_primary_loss']:.4f} {100 * r['test_primary_acc']:5.2f}% "
        f"{test_aux}| {r['seconds']:.1f}s"
    )


# ---------------------------------------------------------------------------------------------
# Settings: checks, run names, published figures


def check_config(cfg: Config) -> Config:
    """Refuse impossible settings before anything runs; return the config to run, its derived defaults resolved
    (the data's; the domains task's auxiliary reduction by mode). A setting of another task or mode is refused."""
    defaults, domains, upper = Config(task=cfg.task), cfg.task == "domains", cfg.mode in ("maoal", "aux")
    only_with = experiment.only_with
    only_with(cfg, "--task domains", domains, defaults, "target_domain", "aux_domains", "renormalize", "dev_fraction")
    only_with(cfg, "--task domains", domains, defaults, "aux_reduction")
    only_with(cfg, "--task hierarchy", not domains, defaults, "primary_level", "aux_level", "dev_size")
    only_with(cfg, "--mode maoal or aux", upper, defaults, "meta_every", "neumann_terms", "authors_neumann_sum")
    only_with(cfg, "--mode maoal or aux", upper, defaults, "hypergrad_clip")
    lambdas = ("neumann_alpha", "lambda_activation", "lambda_optimizer", "lambda_lr", "lambda_weight_decay")
    only_with(cfg, "--mode maoal", cfg.mode == "maoal", defaults, *lambdas, "lambda_momentum")
    only_with(cfg, "--lambda-optimizer sgd", cfg.lambda_optimizer == "sgd", defaults, "lambda_momentum")
    combiner = ("combiner_hidden", "combiner_lr", "combiner_momentum", "combiner_weight_decay", "combiner_alpha")
    only_with(cfg, "--mode aux", cfg.mode == "aux", defaults, *combiner)
    only_with(cfg, "--lr-schedule step", cfg.lr_schedule == "step", defaults, "lr_step", "lr_gamma")
    cfg = experiment.check_data(
        cfg, "maoal", backbones=("vgg16", "resnet18"),
        backbones_because="lambda weighs VGG-16's five blocks or ResNet-18's stem and four stages",
        cifar100_only=CIFAR100_ONLY,
    )  # fmt: skip
    require(
        cfg,
        at_least_1=("epochs", "batch_size", "lr_step", "dev_size", "meta_every", "neumann_terms"),
        at_least_0=("focal_gamma", "weight_decay", "lambda_weight_decay", "combiner_weight_decay"),
        positive=("lr", "lr_gamma", "neumann_alpha", "lambda_lr", "hypergrad_clip", "combiner_lr", "combiner_alpha"),
        fraction=("momentum", "lambda_momentum", "combiner_momentum"),
    )
    try:
        hidden = [int(h) for h in cfg.combiner_hidden.split(",")]
    except ValueError:
        hidden = [0]
    if not hidden or min(hidden) < 1:
        raise UsageError(f"{setting(cfg, 'combiner_hidden')}: give widths of at least 1, e.g. 5,5")
    if cfg.task == "hierarchy":
        if cfg.backbone != "vgg16":
            raise UsageError(
                f"{setting(cfg, 'backbone')}: the hierarchy task's lambda weighs VGG-16's five blocks; "
                f"{cfg.backbone} runs the authors' CIFAR-100/20, --task domains"
            )
        if cfg.aux_level <= cfg.primary_level:
            raise UsageError(
                f"{setting(cfg, 'aux_level')} must be finer than {setting(cfg, 'primary_level')} "
                f"(choose from {', '.join(str(n) for n in LEVELS if n > cfg.primary_level)})"
            )
        return cfg
    try:
        domains = aux_domain_list(cfg.aux_domains)
    except ValueError:
        domains = ()
    if not domains or not all(0 <= d < 20 for d in [*domains, cfg.target_domain]):
        raise UsageError(
            f"{setting(cfg, 'target_domain')} and {setting(cfg, 'aux_domains')}: superclasses are 0-19, the "
            "auxiliary ones as a list such as 0-9 or 0,3,5"
        )
    if cfg.target_domain in domains or len(set(domains)) != len(domains):
        raise UsageError(f"{setting(cfg, 'aux_domains')}: each once, and not {setting(cfg, 'target_domain')}")
    if not 0 < cfg.dev_fraction < 1:
        raise UsageError(f"{setting(cfg, 'dev_fraction', with_value=False)} must be in (0, 1) (got {cfg.dev_fraction})")
    if cfg.aux_reduction is None:
        cfg = dataclasses.replace(cfg, aux_reduction="mean" if cfg.mode == "maoal" else "sum")
    return cfg


def run_name_stem(cfg: Config) -> str:
    if cfg.task == "domains":
        return f"maoal-{cfg.mode}-domain{cfg.target_domain}-aux{cfg.aux_domains.replace(',', '_')}-seed{cfg.seed}"
    return f"maoal-{cfg.mode}-pri{cfg.primary_level}-aux{cfg.aux_level}-seed{cfg.seed}"


def paper_settings(cfg: Config) -> dict:
    """The paper's values of the settings that change the result and are not in run_name_stem.

    A fixed record, not Config's defaults: a run whose settings differ gets a hash of them in its name.
    The upper level's settings count in the modes that use them only (maoal: lambda's; aux: the combiner's)."""
    if cfg.task == "domains":
        paper = dict(TASK_DEFAULTS["domains"], aux_reduction="mean" if cfg.mode == "maoal" else "sum")
        del paper["meta_every"], paper["lambda_optimizer"], paper["lambda_lr"], paper["lambda_weight_decay"]
        if cfg.mode == "aux":  # its combiner takes the losses one by one
            del paper["aux_reduction"]
        paper |= {"renormalize": True, "dev_fraction": 0.05}
        upper = {"meta_every": 10, "neumann_terms": 3, "hypergrad_clip": 10.0, "authors_neumann_sum": True}
        if cfg.mode == "maoal":
            paper |= upper | {
                "neumann_alpha": 1.0,
                "lambda_activation": "softplus",
                "lambda_optimizer": "adam",
                "lambda_lr": 1e-2,
                "lambda_weight_decay": 5e-4,
            }
    else:
        paper = {"batch_size": 100, "lr": 0.01, "lr_step": 50, "lr_gamma": 0.5, "focal_gamma": 2.0, "dev_size": 500}
        paper |= {"momentum": 0.0, "weight_decay": 0.0, "lr_schedule": "step"}
        upper = {"meta_every": 20, "neumann_terms": 3, "hypergrad_clip": 10.0, "authors_neumann_sum": True}
        if cfg.mode == "maoal":
            paper |= upper | {
                "neumann_alpha": 1.0,
                "lambda_activation": "softplus",
                "lambda_optimizer": "sgd",
                "lambda_lr": 1e-3,
                "lambda_momentum": 0.9,
                "lambda_weight_decay": 0.0,
            }
    if cfg.mode == "aux":  # the authors' train_aux_model (forchchch/MAOAL@4a750de, train.py lines 305-308)
        paper |= upper | {
            "combiner_hidden": "5,5",
            "combiner_lr": 1e-3,
            "combiner_momentum": 0.9,
            "combiner_weight_decay": 5e-4,
            "combiner_alpha": 1e-4,
        }
    return paper


def derived_settings(cfg: Config) -> dict:
    """Values computed from the flags, stored beside them in metrics.json."""
    if cfg.task == "domains":
        modules = RESNET_MODULES if cfg.backbone == "resnet18" else MODULES
        return {
            "aux_domain_list": list(aux_domain_list(cfg.aux_domains)),
            "target_classes": list(domain_classes(cfg.target_domain)),
            "lambda_modules": list(modules),
        }
    return {"aux_classes": cfg.aux_level, "lambda_modules": list(MODULES)}


def published_accuracy(cfg: Config) -> dict[str, float]:
    """Published test accuracy (%) for this configuration, where one exists: none (unpublished_because)."""
    return {}


def unpublished_because(cfg: Config) -> str:
    if cfg.task == "domains":
        return (
            "the MAOAL paper (Chen et al., NeurIPS 2022) added its CIFAR-100/20 experiment after review, and its "
            "figures are not in this repository (look in the paper's supplementary material)"
        )
    return (
        "the MAOAL authors' CIFAR-100 experiment is another setting (--task domains: ResNet-18, one superclass's 5 "
        "classes as the target task, ten others as auxiliary tasks), and Human's figures hold no developing set out"
    )


# ---------------------------------------------------------------------------------------------
# The data: the domains task's split, the developing set


def dev_quotas(class_counts: np.ndarray, dev_size: int) -> np.ndarray:
    """Images per class in a developing set of dev_size, stratified: each class's share of dev_size, rounded by
    largest remainder (ties to the lower class) so that they sum to dev_size."""
    shares = dev_size * class_counts / class_counts.sum()
    quotas = np.floor(shares).astype(np.int64)
    quotas[np.argsort(quotas - shares, kind="stable")[: dev_size - quotas.sum()]] += 1
    return quotas


def held_out(train_set: CIFAR100, cfg: Config) -> np.ndarray:
    """Indices of the developing set: --dev-size training images (domains: --dev-fraction of the target's),
    stratified by primary class, drawn from --seed. Held out in every mode, so that all train on the same images."""
    if cfg.task == "domains":
        primary = domain_targets(train_set.labels).numpy()
        num_classes, dev_size, name = 5, max(1, round(cfg.dev_fraction * len(primary))), "dev_fraction"
    else:
        primary = train_set.labels[:, level_index(cfg.primary_level)].numpy()
        num_classes, dev_size, name = cfg.primary_level, cfg.dev_size, "dev_size"
    counts = np.bincount(primary, minlength=num_classes)
    quotas = dev_quotas(counts, dev_size)
    emptied = np.flatnonzero((quotas >= counts) & (counts > 0))
    if len(emptied):
        c = emptied[0]
        raise UsageError(
            f"{setting(cfg, name)} is more than this training set allows: stratified by primary class, class {c} "
            f"has {plural(counts[c], 'training image')} and its share would be {quotas[c]}, leaving it none; choose a "
            f"smaller {setting(cfg, name, with_value=False)}"
        )
    rng = np.random.default_rng(cfg.seed)
    chosen = [rng.choice(np.flatnonzero(primary == c), size=q, replace=False) for c, q in enumerate(quotas) if q]
    return np.sort(np.concatenate(chosen))


def split_data(train_set: CIFAR100, test_set: CIFAR100, cfg: Config):
    """Domains: the target superclass's train and test images, and each auxiliary superclass's train images (the
    authors' CIFAR100MTL, forchchch/MAOAL@4a750de dataset.py); hierarchy: the data as it is."""
    if cfg.task != "domains":
        return train_set, test_set, []
    target, auxiliary = cfg.target_domain, aux_domain_list(cfg.aux_domains)
    for name, data in (("training", train_set), ("test", test_set)):
        missing = [d for d in (target, *auxiliary) if not len(domain_indices(data.labels, d))]
        if missing and (name == "training" or target in missing):
            raise UsageError(f"superclass {missing[0]} has no {name} images in this dataset")
    return (
        train_set.subset(domain_indices(train_set.labels, target)),
        test_set.subset(domain_indices(test_set.labels, target)),
        [train_set.subset(domain_indices(train_set.labels, d)) for d in auxiliary],
    )


# ---------------------------------------------------------------------------------------------
# The run

# What checkpoint.pt holds (the combiner's entries in aux mode only), and the optimisers' learning rates by the
# names the epoch records give them.
SAVED = ("model", "module_weights", "optimizer", "lambda_optimizer", "scheduler", "combiner", "combiner_optimizer")
RATES = {"optimizer": "lr", "lambda_optimizer": "lr_lambda", "combiner_optimizer": "lr_combiner"}


def main(argv: list[str] | None = None) -> None:
    """Parse the flags into Config, open the run, load the data (domains: split into the target's and the
    auxiliary domains'), hold the developing set out, build, resume; then each epoch train (with the upper level),
    evaluate, step the schedule, save and print; then the summary. A refusal is one line and exit code 2."""
    with experiment.Run(argv) as run:
        cfg = check_config(run.parse(Config, __doc__))
        run.open(
            "maoal", cfg, run_name_stem(cfg), paper_settings(cfg), derived_settings(cfg),
            published_accuracy(cfg), unpublished_because(cfg),
        )  # fmt: skip
        train_set, test_set = run.datasets()
        train_set, test_set, aux_sets = split_data(train_set, test_set, cfg)
        train_set, dev_set = train_set.split(held_out(train_set, cfg), held_out_transform=test_set.transform)
        data = run.loaders(train_set, test_set, dev_set, aux_sets)
        state = build(cfg, run.device)
        saved = {name: state[name] for name in SAVED if name in state}
        run.resume(saved)
        graphs = StepGraphs([state[name] for name in RATES if name in state], run.device, cfg.cuda_graphs)
        if cfg.smoke:
            run.smoke_baseline(evaluate(state, graphs, data.test, cfg, run.device))
        for epoch in run.epochs():
            rates = {rate: state[name].param_groups[0]["lr"] for name, rate in RATES.items() if name in state}
            metrics = train_epoch(state, graphs, data, cfg, run.device, epoch)
            metrics |= evaluate(state, graphs, data.test, cfg, run.device)
            state["scheduler"].step()
            record = run.save(saved, metrics | rates)
            run.say(epoch_line(record, cfg.epochs))
        run.finish()


if __name__ == "__main__":
    main()
