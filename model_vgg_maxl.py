"""MAXL: Meta Auxiliary Learning on CIFAR-100 with VGG-16 (Liu, Davison, Johns, NeurIPS 2019).

A multi-task VGG-16 (theta_1) learns the primary task (default: the 20 CIFAR-100 superclasses)
together with an auxiliary task whose labels a second VGG-16, the label generator (theta_2),
produces. psi[i] auxiliary classes belong to primary class i (mask softmax). The generator is
trained by meta-learning: one SGD step of theta_1 on its labels should lower the primary loss.
Reproduces the MAXL curve of the paper's Figure 3 (primary 20, auxiliary 100 by default).

    python model_vgg_maxl.py                                  # the paper's run: 200 epochs, psi = [5] * 20
    python model_vgg_maxl.py --meta-grad finite-difference    # the authors' faster first-order variant
    python model_vgg_maxl.py --primary-level 10 --aux-level 20     # any pair of the hierarchy, psi from it
    python model_vgg_maxl.py --primary-level 3 --psi 2,3,4 --epochs 50
    python model_vgg_maxl.py --smoke                          # one-minute install check on CPU

To change the experiment, edit `Config` below or pass the flag: every field is one, and the two are the same;
psi may be written as the authors did, e.g. `[5] * 20` or `[2, 3, 4]`. main(), at the bottom, holds the run
loop; it calls experiment.py for the run machinery (flags, the run folder, checkpoints, resume). Prints one line
per epoch (train, gradient cosine, meta step, test, generator usage) and writes results/<run-name>/metrics.json
and checkpoint.pt after every epoch; --resume continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import experiment
from create_dataset import LEVELS, hierarchy_psi, primary_labels
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

META_GRADIENT_METHODS = ("second-order", "finite-difference", "double-backward")
MAX_AUX_CLASSES = 10_000  # 100 times the paper's; the auxiliary heads grow with it (about 8 kB a class)
DEFAULT_PSI = 5  # auxiliary classes per class on datasets without a hierarchy, as the WAMAL authors' CIFAR-10 runs

# Forward-mode AD through BatchNorm (the meta-gradient) makes torch import its JVP decompositions, which call
# the deprecated torch.jit.script: a note on torch's own internals, of no use to whoever runs this script.
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning, module="torch")


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
    aux_level: int | None = option(
        None,
        "auxiliary task from the hierarchy: psi[i] = the number of classes of this finer level inside "
        "primary class i; default: 100, or the level a given psi matches",
        type=int,
        choices=(10, 20, 100),
    )
    # psi[i] auxiliary classes for primary class i, as the authors wrote it: [5] * 20 is the hierarchy's 20 -> 100,
    # [2, 3, 4] three primary classes. None takes it from the hierarchy (primary_level -> aux_level).
    psi: list[int] | str | None = option(
        None,
        "auxiliary classes per primary class: k (k for every class) or a comma list, one per class; default: the "
        "hierarchy's at --aux-level ([5] * 20 for 20 -> 100), 5 per class on the other datasets",
        type=str,
    )
    epochs: int = option(200, "training epochs")
    batch_size: int = option(100, "images per batch, train and test")
    lr: float = option(0.01, "multi-task network (theta_1): SGD learning rate, no momentum, no weight decay")
    lr_step: int = option(
        50, "both learning rates (and the inner step) are multiplied by --lr-gamma every this many epochs"
    )
    lr_gamma: float = option(0.5, "StepLR factor")
    focal_gamma: float = option(2.0, "focal loss exponent (paper: 2)")
    gen_lr: float = option(1e-3, "label generator (theta_2): SGD learning rate")
    gen_weight_decay: float = option(5e-4, "label generator: SGD weight decay")
    entropy_weight: float = option(0.2, "weight of the negative entropy of the batch-mean generated labels")
    aux_weight: float = option(1.0, "weight of the auxiliary loss in the training step and virtual step (the paper: 1)")
    meta_grad: str = option(
        "second-order",
        "theta_2 gradient: exact second-order (forward-mode JVP), the authors' "
        "finite-difference approximation, or the exact one by double backward (slower)",
        choices=META_GRADIENT_METHODS,
    )
    fd_step: float = option(0.01, "finite-difference step: eps = fd_step / ||d|| (reference: 0.01)")
    cossim_every: int = option(
        10, "compute the primary/auxiliary gradient cosine every N steps (1 = every step, as the reference)"
    )


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
    """The multi-task network theta_1: primary head `classifier1`, auxiliary head `classifier2`. Returns logits."""

    def __init__(self, psi: list[int], backbone: nn.Module | None = None):
        super().__init__(backbone)
        self.classifier1 = head(len(psi), self.num_features)
        self.classifier2 = head(sum(psi), self.num_features)
        init_weights(self, nn.init.xavier_uniform_)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.classifier1(features), self.classifier2(features)


MASK_FLOOR = 1e-8  # the reference's weight for auxiliary classes outside the sample's block


def block_log_mask(psi: list[int]) -> torch.Tensor:
    """(len(psi), sum(psi)) log-mask: 0 on block i (primary class i's auxiliary classes), log(1e-8) elsewhere."""
    mask = torch.full((len(psi), sum(psi)), MASK_FLOOR)
    start = 0
    for i, size in enumerate(psi):
        mask[i, start : start + size] = 1.0
        start += size
    return mask.log()


def mask_softmax(logits: torch.Tensor, log_mask: torch.Tensor) -> torch.Tensor:
    """exp(x) * mask / sum(exp(x) * mask), computed as softmax(x + log mask): no overflow."""
    return torch.softmax(at_least_float32(logits) + log_mask, dim=1)


class LabelGenerator(Trunk):
    """The label-generation network theta_2: its own VGG-16 and head `classifier` with sum(psi) outputs."""

    def __init__(self, psi: list[int], backbone: nn.Module | None = None):
        super().__init__(backbone)
        self.classifier = head(sum(psi), self.num_features)
        # Not persistent: the state dict keeps the reference's keys.
        self.register_buffer("log_mask", block_log_mask(psi), persistent=False)
        init_weights(self, nn.init.xavier_normal_)

    def forward(self, x: torch.Tensor, y_primary: torch.Tensor) -> torch.Tensor:
        """Auxiliary label distribution (N, sum(psi)), confined to the block of each sample's primary class."""
        return mask_softmax(self.classifier(self.features(x)), self.log_mask[y_primary])


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


def negative_entropy(label_probs: torch.Tensor) -> torch.Tensor:
    """sum_k q_k log q_k of the batch-mean distribution q: low when the batch uses many classes."""
    q = label_probs.mean(0)
    return torch.xlogy(q, q).sum()


def gradient_cosine(primary_grads: list[torch.Tensor], auxiliary_grads: list[torch.Tensor]) -> torch.Tensor:
    """The reference's diagnostic (its code since "update for pytorch 1.8"): each gradient reshaped to
    (output channels, -1), the cosine of the two gradients per output channel, averaged; then the mean over tensors."""
    cosines = [
        F.cosine_similarity(g1.reshape(len(g1), -1), g2.reshape(len(g2), -1), dim=1).mean()
        for g1, g2 in zip(primary_grads, auxiliary_grads)
    ]
    return torch.stack(cosines).mean()


# ---------------------------------------------------------------------------------------------
# The meta-gradient
#
# The label generator minimises J(theta_2) = L_pri(theta_1^+) + entropy_weight * negative_entropy(labels),
# theta_1^+ = theta_1 - inner_lr * grad_theta_1 (L_pri + w L_aux(labels(theta_2))), w = --aux-weight. L_aux is
# linear in the generated labels t, so the chain rule through theta_1^+ collapses to a gradient w.r.t. t,
#     dJ/dt_ik = -inner_lr w / N * D_d focal_aux_ik(theta_1),   d = grad L_pri(theta_1^+),
# the directional derivative along d of the auxiliary head's per-class focal terms (aux_slope: by forward mode,
# second-order, or the authors' central difference, finite-difference), followed by one backward through the
# generator (generator_gradients). double-backward backpropagates through the inner gradient instead: the oracle.
# The auxiliary loss enters as a function of the auxiliary logits, so WAMAL's weighted loss takes the same path.


def auxiliary_path(model: VGG16) -> list[tuple[str, nn.Module]]:
    """(name, layer) from the images to the auxiliary logits, in the order VGG16.forward applies them."""
    return [
        (name, layer)
        for name, layer in model.named_modules()
        if name.startswith(("block", "classifier2.")) and not list(layer.children())
    ]


@contextlib.contextmanager
def recorded_inputs(layers: list[nn.Module]):
    """Yields a dict that receives, for each of `layers`, the input of its forward call (detached) inside the block."""
    inputs: dict[nn.Module, torch.Tensor] = {}

    def record(layer: nn.Module, args: tuple) -> None:
        inputs[layer] = args[0].detach()

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def generated_labels(label_generator: LabelGenerator, images: torch.Tensor, primary: torch.Tensor) -> torch.Tensor:
    """The generator's labels, differentiable w.r.t. theta_2; batch statistics, its running statistics untouched."""
    buffers = {name: b.clone() for name, b in label_generator.named_buffers()}
    return functional_call(label_generator, (dict(label_generator.named_parameters()), buffers), (images, primary))


@dataclass
class InnerStep:
    """The virtual step of theta_1 on one batch, what the generator gave taken as constants."""

    theta1: dict[str, torch.Tensor]  # the multi-task network's parameters, detached
    buffers: dict[str, torch.Tensor]  # throw-away copies of its BatchNorm statistics
    primary_logits: torch.Tensor  # at theta_1
    aux_logits: torch.Tensor  # at theta_1
    primary_plus: torch.Tensor  # primary logits at theta_1^+
    direction: dict[str, torch.Tensor]  # d = grad L_pri(theta_1^+)
    layer_inputs: dict[nn.Module, torch.Tensor]  # inputs of the `record`ed layers at theta_1


def inner_step(
    model: VGG16,
    images: torch.Tensor,
    primary_target: torch.Tensor,
    aux_loss,
    inner_lr: float,
    focal_gamma: float,
    record: tuple[nn.Module, ...] = (),
) -> InnerStep:
    """theta_1^+ = theta_1 - inner_lr * grad(L_pri + aux_loss), and d = grad L_pri(theta_1^+); `aux_loss` maps the
    auxiliary logits to the auxiliary loss, its targets taken as constants. No graph is kept."""
    theta1 = {name: p.detach() for name, p in model.named_parameters()}
    # Running statistics go to throw-away copies: the meta step must not change the networks it involves.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.enable_grad():
        leaves = {name: p.detach().requires_grad_() for name, p in theta1.items()}
        with recorded_inputs(record) as layer_inputs:
            primary_logits, aux_logits = functional_call(model, (leaves, buffers), (images,))
        train_loss = focal_loss(primary_logits, primary_target, focal_gamma) + aux_loss(aux_logits)
        grads = torch.autograd.grad(train_loss, list(leaves.values()))
        theta1_plus = {name: (p - inner_lr * g).requires_grad_() for (name, p), g in zip(theta1.items(), grads)}
        primary_plus = functional_call(model, (theta1_plus, buffers), (images,))[0]
        d = torch.autograd.grad(
            focal_loss(primary_plus, primary_target, focal_gamma),
            list(theta1_plus.values()),
            allow_unused=True,
            materialize_grads=True,
        )
    return InnerStep(theta1, buffers, primary_logits, aux_logits, primary_plus, dict(zip(theta1, d)), layer_inputs)


def path_tangent(
    path: list[tuple[str, nn.Module]],
    inputs: dict[nn.Module, torch.Tensor],
    params: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Forward-mode derivative of the path's output along `direction` (one tangent per parameter).

    The same as a JVP through the path with tangent-free images, minus its primal forward pass: every
    layer's input is the one `recorded_inputs` kept from a forward pass at `params`. Conv2d and Linear
    are bilinear in (input, parameters), so their tangent is layer(tangent; W, 0) + layer(input; dW, db),
    two of the JVP's three convolutions. The other layers (BatchNorm with batch statistics, ReLU,
    max-pool) are cheap and go through forward-mode AD; an in-place ReLU rewrites its recorded input,
    which already holds its output, with the same values. Between layers the tangent takes the shape of
    the next layer's input (the trunk's flatten).
    """
    tangent = None
    for name, layer in path:
        layer_input = inputs[layer]
        if tangent is not None:
            tangent = tangent.reshape(layer_input.shape)
        own = {key: params[f"{name}.{key}"] for key, _ in layer.named_parameters()}
        along = {key: direction[f"{name}.{key}"] for key in own}
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            out = functional_call(layer, along, (layer_input,))
            if tangent is not None:
                out = out + functional_call(layer, {**own, "bias": torch.zeros_like(own["bias"])}, (tangent,))
            tangent = out
        else:
            own_buffers = {key: buffers[f"{name}.{key}"] for key, _ in layer.named_buffers()}
            if tangent is None:
                tangent = torch.zeros_like(layer_input)
            with fwAD.dual_level():
                dual = {key: fwAD.make_dual(p, along[key]) for key, p in own.items()}
                out = functional_call(layer, (dual, own_buffers), (fwAD.make_dual(layer_input, tangent),))
                tangent = fwAD.unpack_dual(out).tangent
    return tangent


def tangent_path(model: VGG16, images: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The layers path_tangent follows: VGG-16's at 32x32, which apply one after another; none for another
    backbone or larger images (whose VGG features are pooled), which take network_tangent."""
    return auxiliary_path(model) if model.backbone is None and images.shape[-1] == 32 else []


def network_tangent(
    model: VGG16,
    params: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    images: torch.Tensor,
) -> torch.Tensor:
    """Forward-mode derivative of the auxiliary logits along `direction` through any network: one forward pass
    with dual parameters. A layer that has no forward-mode rule is refused in one line."""
    try:
        with fwAD.dual_level():
            dual = {name: fwAD.make_dual(p, direction[name]) for name, p in params.items()}
            return fwAD.unpack_dual(functional_call(model, (dual, buffers), (images,))[1]).tangent
    except NotImplementedError as error:
        raise UsageError(
            f"--meta-grad second-order: torch {torch.__version__} has no forward-mode rule for a layer of this "
            f"network ({str(error).splitlines()[0]}); use --meta-grad double-backward (exact, slower)"
        ) from None


def aux_slope(
    model: VGG16,
    images: torch.Tensor,
    step: InnerStep,
    method: str,
    focal_gamma: float,
    fd_step: float,
    path: list[tuple[str, nn.Module]],
) -> torch.Tensor:
    """D_d focal_aux_ik(theta_1), (N, K): second-order exactly, by forward mode (path_tangent along VGG-16's `path`,
    reusing the forward pass at theta_1; network_tangent through any other backbone); finite-difference as the
    authors' first-order variant (DARTS), a central difference at theta_1 +- eps * d, eps = fd_step / ||d||."""
    with torch.no_grad():
        if method == "finite-difference":
            d = step.direction
            eps = fd_step / torch.sqrt(sum(v.pow(2).sum() for v in d.values()))

            def aux_focal_terms(sign: int) -> torch.Tensor:
                shifted = {name: p + sign * eps * d[name] for name, p in step.theta1.items()}
                return focal_terms(functional_call(model, (shifted, step.buffers), (images,))[1], focal_gamma)

            return (aux_focal_terms(+1) - aux_focal_terms(-1)) / (2 * eps)
        if path:
            aux_tangent = path_tangent(path, step.layer_inputs, step.theta1, step.direction, step.buffers)
        else:
            aux_tangent = network_tangent(model, step.theta1, step.direction, step.buffers, images)
        with fwAD.dual_level():
            aux_dual = fwAD.make_dual(step.aux_logits.detach(), aux_tangent)
            return fwAD.unpack_dual(focal_terms(aux_dual, focal_gamma)).tangent


def generator_gradients(
    label_generator: nn.Module,
    products: torch.Tensor,
    labels: torch.Tensor,
    product_grad: torch.Tensor,
    entropy_weight: float,
) -> list[torch.Tensor]:
    """grad_theta_2 of J, given dJ/dp (`product_grad`, constant) for what the auxiliary loss is linear in (`products`:
    the labels; in WAMAL, their products with the images' weights): one backward through the generator."""
    surrogate = (products * product_grad).sum() + entropy_weight * negative_entropy(labels)
    return list(torch.autograd.grad(surrogate, list(label_generator.parameters())))


def double_backward(
    model: VGG16,
    label_generator: nn.Module,
    images: torch.Tensor,
    primary_target: torch.Tensor,
    aux_loss,
    labels: torch.Tensor,
    inner_lr: float,
    entropy_weight: float,
    focal_gamma: float,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Exact, the reference's way: backpropagate J through the inner gradient (create_graph=True), `aux_loss` (the
    auxiliary logits -> the auxiliary loss) differentiable w.r.t. theta_2 through the generated `labels`. Slowest;
    kept as the test oracle. Returns grad_theta_2 J and the primary logits at theta_1 and at theta_1^+."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    params = dict(model.named_parameters())
    primary_logits, aux_logits = functional_call(model, (params, buffers), (images,))
    train_loss = focal_loss(primary_logits, primary_target, focal_gamma) + aux_loss(aux_logits)
    grads = torch.autograd.grad(train_loss, list(params.values()), create_graph=True)
    theta1_plus = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
    primary_plus = functional_call(model, (theta1_plus, buffers), (images,))[0]
    objective = focal_loss(primary_plus, primary_target, focal_gamma) + entropy_weight * negative_entropy(labels)
    grads = list(torch.autograd.grad(objective, list(label_generator.parameters())))
    return grads, primary_logits.detach(), primary_plus.detach()


def virtual_step_statistics(
    primary_logits: torch.Tensor, primary_plus: torch.Tensor, primary: torch.Tensor, focal_gamma: float
) -> dict[str, torch.Tensor]:
    """The primary loss and accuracy at theta_1 and at theta_1^+ (tensors): what the virtual step did."""
    primary_target = F.one_hot(primary, primary_logits.shape[1]).float()
    with torch.no_grad():
        return {
            "meta_primary_loss_before": focal_loss(primary_logits, primary_target, focal_gamma),
            "meta_primary_acc_before": (primary_logits.argmax(1) == primary).float().mean(),
            "meta_primary_loss_after": focal_loss(primary_plus, primary_target, focal_gamma),
            "meta_primary_acc_after": (primary_plus.argmax(1) == primary).float().mean(),
        }


def meta_gradients(
    *,
    model: VGG16,
    label_generator: LabelGenerator,
    images: torch.Tensor,
    primary: torch.Tensor,
    inner_lr: float,
    method: str = "second-order",
    entropy_weight: float = 0.2,
    focal_gamma: float = 2.0,
    fd_step: float = 0.01,
    aux_weight: float = 1.0,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """grad_theta_2 J for every label-generator parameter, by `method` (META_GRADIENT_METHODS); and the virtual
    step's statistics (virtual_step_statistics).

    BatchNorm uses batch statistics, as in training. Parameters, buffers and .grad of both networks are
    left as they were."""
    if method not in META_GRADIENT_METHODS:
        raise ValueError(f"unknown meta-gradient method {method!r}; one of {META_GRADIENT_METHODS}")
    primary_target = F.one_hot(primary, model.classifier1[-1].out_features).float()
    # Attention's fused kernels have neither forward-mode rules nor second derivatives: the math kernel has both.
    with sdpa_kernel(SDPBackend.MATH):
        labels = generated_labels(label_generator, images, primary)
        if method == "double-backward":
            grads, primary_logits, primary_plus = double_backward(
                model, label_generator, images, primary_target,
                lambda logits: aux_weight * focal_loss(logits, labels, focal_gamma),
                labels, inner_lr, entropy_weight, focal_gamma,
            )  # fmt: skip
        else:
            path = tangent_path(model, images) if method == "second-order" else []
            step = inner_step(
                model, images, primary_target,
                lambda logits: aux_weight * focal_loss(logits, labels.detach(), focal_gamma),
                inner_lr, focal_gamma, tuple(layer for _, layer in path),
            )  # fmt: skip
            slope = aux_slope(model, images, step, method, focal_gamma, fd_step, path)
            label_grad = -inner_lr * aux_weight / images.shape[0] * slope
            grads = generator_gradients(label_generator, labels, labels, label_grad, entropy_weight)
            primary_logits, primary_plus = step.primary_logits, step.primary_plus
    return grads, virtual_step_statistics(primary_logits, primary_plus, primary, focal_gamma)


# ---------------------------------------------------------------------------------------------
# Training and evaluation steps


def train_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config, diagnose: bool) -> dict:
    """Phase 1 on one batch: an SGD step of theta_1 on L_pri + L_aux, the generated labels taken as given.

    With `diagnose`, also the cosine between the primary and auxiliary gradients on the trunk.
    Returns the batch's metrics as tensors (no host sync).
    """
    model, optimizer = state["model"], state["optimizer"]
    primary = primary_labels(labels, cfg)
    with autocast(cfg, images.device):
        with torch.no_grad():  # phase 1 does not train the generator: no graph for it
            aux_targets = state["forward_generator"](images, primary)
        # The diagnostic backpropagates three times through one graph; a torch.compile'd network's backward
        # may run only once (donated buffers), so diagnostic steps run the eager network: same arithmetic.
        forward_model = state["model"] if diagnose else state["forward_model"]
        primary_logits, aux_logits = forward_model(images)
    primary_loss = focal_loss(primary_logits, F.one_hot(primary, cfg.primary_level).float(), cfg.focal_gamma)
    aux_loss = focal_loss(aux_logits, aux_targets, cfg.focal_gamma)
    out = {
        "loss": primary_loss + cfg.aux_weight * aux_loss,
        "train_primary_loss": primary_loss,
        "train_primary_acc": (primary_logits.argmax(1) == primary).float().mean(),
        "train_aux_loss": aux_loss,
        "aux_assigned": aux_targets.argmax(1),
    }
    if diagnose:
        shared = model.shared_parameters()
        # Two separate passes, as the reference: total - primary would differ in the conv biases, whose
        # gradient before BatchNorm is zero up to rounding, and so would their cosine.
        primary_grads = torch.autograd.grad(primary_loss, shared, retain_graph=True)
        aux_grads = torch.autograd.grad(aux_loss, shared, retain_graph=True)
        out["train_cosine"] = gradient_cosine(primary_grads, aux_grads)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return out


def meta_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict:
    """Phase 2 on one batch: an SGD step of theta_2 along meta_gradients; theta_1 stays as it is.

    The inner step size is the multi-task optimiser's current learning rate.
    Returns the primary loss and accuracy before and after the virtual step (tensors).
    """
    label_generator = state["label_generator"]
    primary = primary_labels(labels, cfg)
    inner_lr = state["optimizer"].param_groups[0]["lr"]
    # Always fp32, also with --amp: the meta-gradient is a small difference of large terms, and in
    # bf16 it is noise (cosine 0.29 to the float64 gradient on a random batch; fp32: 0.986).
    grads, stats = meta_gradients(
        model=state["model"],
        label_generator=label_generator,
        images=images,
        primary=primary,
        inner_lr=inner_lr,
        method=cfg.meta_grad,
        entropy_weight=cfg.entropy_weight,
        focal_gamma=cfg.focal_gamma,
        fd_step=cfg.fd_step,
        aux_weight=cfg.aux_weight,
    )
    for p, g in zip(label_generator.parameters(), grads):
        p.grad = g
    state["gen_optimizer"].step()
    return stats


def train_epoch(state: dict, graphs: StepGraphs, loader, cfg: Config, device: torch.device, epoch: int) -> dict:
    """Phase 1 over the train set (theta_1), then phase 2 over it again (theta_2)."""
    meter = Meter()
    guard = FiniteGuard(device)
    state["model"].train()
    state["label_generator"].train()
    num_aux = state["model"].classifier2[-1].out_features
    aux_used = torch.zeros(num_aux, dtype=torch.bool, device=device)
    phase1 = {diagnose: functools.partial(train_step, state, cfg=cfg, diagnose=diagnose) for diagnose in (False, True)}
    for step, images, labels in batches(loader, cfg, device, phase="phase 1"):
        diagnose = step % cfg.cossim_every == 0
        out = graphs("phase 1 + cosine" if diagnose else "phase 1", phase1[diagnose], images, labels)
        guard.watch(out.pop("loss"), epoch, "phase-1", step)
        aux_used |= F.one_hot(out.pop("aux_assigned"), num_aux).bool().any(0)
        if "train_cosine" in out:
            meter.add("train_cosine", out.pop("train_cosine"), 1)
        for name, value in out.items():
            meter.add(name, value, images.shape[0])
    guard.check(epoch, "phase-1")

    phase2 = functools.partial(meta_step, state, cfg=cfg)
    for step, images, labels in batches(loader, cfg, device, phase="phase 2"):
        stats = graphs("phase 2", phase2, images, labels)
        guard.watch(stats["meta_primary_loss_after"], epoch, "phase-2", step)
        for name, value in stats.items():
            meter.add(name, value, images.shape[0])
    guard.check(epoch, "phase-2")

    metrics = meter.means()
    metrics["aux_classes_used"] = int(aux_used.sum())
    return metrics


def eval_step(state: dict, images: torch.Tensor, labels: torch.Tensor, cfg: Config) -> dict:
    """Test metrics of one batch, as tensors."""
    primary = primary_labels(labels, cfg)
    with autocast(cfg, images.device):
        primary_logits, _ = state["forward_model"](images)
    return {
        "test_primary_loss": focal_loss(primary_logits, F.one_hot(primary, cfg.primary_level).float(), cfg.focal_gamma),
        "test_primary_acc": (primary_logits.argmax(1) == primary).float().mean(),
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
    """The networks, their optimisers and schedulers; forward_model and forward_generator are the networks as the
    steps run them (compiled with --compile)."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = VGG16(cfg.psi, make_backbone(cfg)).to(device, memory_format=memory_format)
    label_generator = LabelGenerator(cfg.psi, make_backbone(cfg)).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    gen_optimizer = torch.optim.SGD(label_generator.parameters(), lr=cfg.gen_lr, weight_decay=cfg.gen_weight_decay)
    return {
        "model": model,
        "label_generator": label_generator,
        "optimizer": optimizer,
        "gen_optimizer": gen_optimizer,
        "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma),
        "gen_scheduler": torch.optim.lr_scheduler.StepLR(gen_optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma),
        "forward_model": torch.compile(model) if cfg.compile else model,
        "forward_generator": torch.compile(label_generator) if cfg.compile else label_generator,
    }


def epoch_line(record: dict, epochs: int) -> str:
    r = record
    return (
        f"epoch {r['epoch']:3d}/{epochs} "
        f"| train pri {r['train_primary_loss']:.4f} {100 * r['train_primary_acc']:5.2f}% "
        f"aux {r['train_aux_loss']:.4f} | cos {r.get('train_cosine', float('nan')):+.4f} "
        f"| meta pri {r['meta_primary_loss_before']:.4f} {100 * r['meta_primary_acc_before']:5.2f}% -> "
        f"{r['meta_primary_loss_after']:.4f} {100 * r['meta_primary_acc_after']:5.2f}% "
        f"| test pri {r['test_primary_loss']:.4f} {100 * r['test_primary_acc']:5.2f}% "
        f"| aux used {r['aux_classes_used']} | {r['seconds']:.1f}s"
    )


# ---------------------------------------------------------------------------------------------
# Settings: checks, run names, published figures


def parse_psi(cfg: Config, psi: str | list[int]) -> list[int]:
    """'5' or [5] -> [5] * primary classes; '2,3,4' or [2, 3, 4] -> [2, 3, 4]; a wrong length, an entry < 1 refused."""
    text = psi if isinstance(psi, str) else ",".join(str(v) for v in psi)
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        shown = f"--psi {text!r}" if "psi" in cfg.flags_given else setting(cfg, "psi")
        raise UsageError(
            f"{shown} is not an integer or a comma list of integers (e.g. --psi 5 or --psi 2,3,4)"
        ) from None
    if len(values) == 1:
        values = values * cfg.primary_level
    if len(values) != cfg.primary_level:
        raise UsageError(
            f"{setting(cfg, 'psi', with_value=False)} has {len(values)} entries but the primary task has "
            f"{cfg.primary_level} classes; give one entry per primary class or a single integer"
        )
    if min(values) < 1:
        raise UsageError(f"{setting(cfg, 'psi', text)}: every primary class needs at least 1 auxiliary class")
    return values


def check_aux_classes(psi: list[int]) -> list[int]:
    """Refuse a psi whose auxiliary heads would not fit in memory, before anything is allocated."""
    if sum(psi) > MAX_AUX_CLASSES:
        head_bytes = sum(psi) * 513 * 4 * 2 * 2  # Linear(512, K) in both networks: float32 weights and gradients
        raise UsageError(
            f"psi gives {sum(psi)} auxiliary classes, whose two heads alone would take {head_bytes / 2**30:.1f} GiB; "
            f"at most {MAX_AUX_CLASSES} are allowed"
        )
    return psi


def resolve_psi(cfg: Config) -> Config:
    """The config with psi a list and aux_level the hierarchy's level psi equals (or None). psi None is the
    hierarchy's at aux_level (default 100) on CIFAR-100 and DEFAULT_PSI per class on the other datasets; --psi
    together with aux_level is refused, and a list psi (the file's, or a checked config's) must agree with it."""
    if cfg.aux_level is not None and cfg.aux_level <= cfg.primary_level:
        raise UsageError(
            f"{setting(cfg, 'aux_level')} must be finer than {setting(cfg, 'primary_level')} "
            f"(choose from {', '.join(str(n) for n in LEVELS if n > cfg.primary_level)})"
        )
    if cfg.dataset != "cifar100":  # no hierarchy: psi alone says how many auxiliary classes each class has
        psi = check_aux_classes(parse_psi(cfg, str(DEFAULT_PSI) if cfg.psi is None else cfg.psi))
        return dataclasses.replace(cfg, psi=psi, aux_level=None)
    if cfg.psi is None:
        aux_level = cfg.aux_level or 100
        return dataclasses.replace(cfg, aux_level=aux_level, psi=hierarchy_psi(cfg.primary_level, aux_level))
    if isinstance(cfg.psi, str) and cfg.aux_level is not None:
        raise UsageError(
            f"{setting(cfg, 'psi')} and {setting(cfg, 'aux_level')} both set psi; give one of them "
            f"(--aux-level takes psi from the hierarchy, --psi sets it yourself)"
        )
    psi = check_aux_classes(parse_psi(cfg, cfg.psi))
    levels = [n for n in LEVELS if n > cfg.primary_level and hierarchy_psi(cfg.primary_level, n) == psi]
    if cfg.aux_level is not None and levels != [cfg.aux_level]:  # a list, as in the file: it must agree
        raise UsageError(
            f"{setting(cfg, 'psi')} is not the hierarchy's at {setting(cfg, 'aux_level')}; set one of them"
        )
    return dataclasses.replace(cfg, psi=psi, aux_level=levels[0] if levels else None)


def check_config(cfg: Config) -> Config:
    """Refuse impossible settings before anything runs; return the config to run, its derived defaults resolved
    (psi a list)."""
    cfg = experiment.check_data(cfg, "maxl")
    require(
        cfg,
        at_least_1=("epochs", "batch_size", "lr_step", "cossim_every"),
        at_least_0=("focal_gamma", "gen_weight_decay", "entropy_weight", "aux_weight"),
        positive=("lr", "lr_gamma", "gen_lr", "fd_step"),
    )
    finite_difference = cfg.meta_grad == "finite-difference"
    experiment.only_with(cfg, "--meta-grad finite-difference", finite_difference, Config(), "fd_step")
    return resolve_psi(cfg)


def run_name_stem(cfg: Config) -> str:
    weight = f"-auxw{cfg.aux_weight:g}" if cfg.aux_weight != 1 else ""
    return f"maxl-{cfg.meta_grad}-pri{cfg.primary_level}-aux{sum(cfg.psi)}{weight}-seed{cfg.seed}"


def paper_settings(cfg: Config) -> dict:
    """The paper's values of the settings that change the result and are not in run_name_stem.

    A fixed record, not Config's defaults: a run whose settings differ gets a hash of them in its name."""
    paper = {
        "psi": hierarchy_psi(cfg.primary_level, cfg.aux_level or 100)
        if cfg.dataset == "cifar100"
        else [DEFAULT_PSI] * cfg.primary_level,
        "batch_size": 100,
        "lr": 0.01,
        "lr_step": 50,
        "lr_gamma": 0.5,
        "focal_gamma": 2.0,
        "gen_lr": 1e-3,
        "gen_weight_decay": 5e-4,
        "entropy_weight": 0.2,
        "cossim_every": 10,
    }
    if cfg.meta_grad == "finite-difference":
        paper["fd_step"] = 0.01
    return paper


def derived_settings(cfg: Config) -> dict:
    """Values computed from the flags, stored beside them in metrics.json."""
    return {"psi_list": cfg.psi, "aux_classes": sum(cfg.psi)}


# Copied from model_vgg_single.py
RL_AUX = "rl-aux notebook, a reproduction: one run, mean of its last 15 of {} epochs"


ABLATION = {0.25: 73.30, 0.5: 74.53, 1.0: 76.28, 2.0: 77.42, 4.0: 79.12}  # rl-aux: MAXL by --aux-weight, 20 -> 100


def published_accuracy(cfg: Config) -> dict[str, float]:
    """Published test accuracy (%) for this configuration, where one exists: the papers' at 20 -> 100, and the
    rl-aux notebook's there (its MAXL run, and its ablation of the auxiliary weight), on CIFAR-10 and on SVHN."""
    figures = {}
    if paper_data(cfg) and cfg.primary_level == 20 and cfg.psi == [5] * 20:
        if cfg.aux_weight == 1:
            figures = {"WAMAL authors' README": 76.6, "derived from the WAMAL paper's abstract": 77.4}
            figures[RL_AUX.format(200)] = 75.98
        if cfg.aux_weight in ABLATION:
            figures[RL_AUX.format(200).replace("one run", "its ablation of the auxiliary weight")] = ABLATION[
                cfg.aux_weight
            ]
    elif cfg.aux_weight == 1 and experiment.data_tag(cfg) in ("cifar10", "svhn"):
        epochs, figure = {"cifar10": (80, 89.91), "svhn": (125, 95.66)}[experiment.data_tag(cfg)]
        figures[RL_AUX.format(epochs)] = figure
    return figures


def unpublished_because(cfg: Config) -> str:
    if cfg.aux_weight not in ABLATION:
        return (
            f"the rl-aux notebook's ablation weighs the auxiliary loss by {', '.join(f'{w:g}' for w in ABLATION)} only"
        )
    return "the MAXL paper shows the pairs other than 20 -> 100 (psi = [5] * 20) only as curves of its Figure 3"


# ---------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> None:
    """Parse the flags into Config, open the run, load the data, build, resume; then each epoch phase 1 and phase 2,
    evaluate, step the schedules, save and print; then the summary. A refusal is one line and exit code 2."""
    with experiment.Run(argv) as run:
        cfg = check_config(run.parse(Config, __doc__))
        run.open(
            "maxl", cfg, run_name_stem(cfg), paper_settings(cfg), derived_settings(cfg),
            published_accuracy(cfg), unpublished_because(cfg),
        )  # fmt: skip
        data = run.loaders(*run.datasets())
        state = build(cfg, run.device)
        names = ("model", "label_generator", "optimizer", "gen_optimizer", "scheduler", "gen_scheduler")
        saved = {name: state[name] for name in names}  # what checkpoint.pt holds
        run.resume(saved)
        graphs = StepGraphs([state["optimizer"], state["gen_optimizer"]], run.device, cfg.cuda_graphs)
        if cfg.smoke:
            run.smoke_baseline(evaluate(state, graphs, data.test, cfg, run.device))
        for epoch in run.epochs():
            rates = {
                "lr": state["optimizer"].param_groups[0]["lr"],
                "lr_gen": state["gen_optimizer"].param_groups[0]["lr"],
            }
            metrics = train_epoch(state, graphs, data.train, cfg, run.device, epoch)
            metrics |= evaluate(state, graphs, data.test, cfg, run.device)
            state["scheduler"].step()
            state["gen_scheduler"].step()
            record = run.save(saved, metrics | rates)
            run.say(epoch_line(record, cfg.epochs))
        run.finish()


if __name__ == "__main__":
    main()
