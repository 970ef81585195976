"""MAOAL (model_vgg_maoal.py): the implicit hypergradient and its Neumann series against closed forms, the lower
level's module-wise gradient in every mode (equal = Human's step, single = Single's, gcs, maoal), the developing
set, and the script end to end: results, resume, run names, refused input.

The mathematics runs in float64: a linear-regression inner problem (its fixed point and implicit gradient in
closed form) and a small network of the VGG's layout (five conv blocks, two heads) whose Jacobians are small
enough to write out densely. The steps that must equal another script's steps run on the real VGG-16.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FAST, REPO, run_main
from torch.func import functional_call

import create_dataset
import experiment
import model_vgg_human as human
import model_vgg_maoal as maoal
import model_vgg_single as single
from create_dataset import CIFAR100, level_index

F64 = torch.float64


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------------------------------
# The Neumann series and the implicit hypergradient on a linear-regression inner problem
#
# W in R^6, three modules of two coordinates. L_pri = 1/2 mean (X W - y)^2, L_aux = 1/2 mean (X W - z)^2, so
# g = (A W - r_y) + Lambda (A W - r_z) with A = X^T X / n, r_y = X^T y / n, r_z = X^T z / n, Lambda = lambda of
# each coordinate's module. dg/dW = (I + Lambda) A, not symmetric; the fixed point solves (I + Lambda) A W =
# r_y + Lambda r_z.

MODULE_OF_COORDINATE = [0, 0, 1, 1, 2, 2]


def regression_problem(orthonormal: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n, d = 40, 6
    x = rng.normal(size=(n, d))
    if orthonormal:
        x = np.linalg.qr(x)[0] * math.sqrt(n)  # X^T X / n = I
    return {
        "x": torch.tensor(x),
        "y": torch.tensor(rng.normal(size=n)),
        "z": torch.tensor(rng.normal(size=n)),
        "x_dev": torch.tensor(rng.normal(size=(15, d))),
        "y_dev": torch.tensor(rng.normal(size=15)),
    }


def regression_fixed_point(p: dict, lam: torch.Tensor) -> torch.Tensor:
    n = len(p["y"])
    a = p["x"].T @ p["x"] / n
    scale = 1 + lam[MODULE_OF_COORDINATE]
    rhs = p["x"].T @ p["y"] / n + lam[MODULE_OF_COORDINATE] * (p["x"].T @ p["z"] / n)
    return torch.linalg.solve(scale[:, None] * a, rhs)


def regression_dev_loss(p: dict, w: torch.Tensor) -> torch.Tensor:
    return 0.5 * (p["x_dev"] @ w - p["y_dev"]).pow(2).mean()


def regression_exact_hypergradient(p: dict, lam: torch.Tensor) -> torch.Tensor:
    """-(dg/dlambda)^T (dg/dW)^-T dL_dev/dW at W*, with dense matrices."""
    n = len(p["y"])
    w = regression_fixed_point(p, lam)
    a = p["x"].T @ p["x"] / n
    jacobian = (1 + lam[MODULE_OF_COORDINATE])[:, None] * a
    aux_grad = a @ w - p["x"].T @ p["z"] / n
    dg_dlam = torch.zeros(6, 3, dtype=F64)
    dg_dlam[torch.arange(6), MODULE_OF_COORDINATE] = aux_grad
    dev_grad = p["x_dev"].T @ (p["x_dev"] @ w - p["y_dev"]) / len(p["y_dev"])
    return -dg_dlam.T @ torch.linalg.solve(jacobian.T, dev_grad)


def regression_script_hypergradient(p: dict, hyper: torch.Tensor, alpha: float, terms: int, softplus: bool = False):
    """The script's implicit_hypergradient on the regression problem at its fixed point, W as three module tensors."""
    lam = F.softplus(hyper) if softplus else hyper
    w_star = regression_fixed_point(p, lam.detach())
    params = [w_star[2 * b : 2 * b + 2].clone().requires_grad_() for b in range(3)]
    w = torch.cat(params)
    primary = 0.5 * (p["x"] @ w - p["y"]).pow(2).mean()
    aux = 0.5 * (p["x"] @ w - p["z"]).pow(2).mean()
    primary_grads = torch.autograd.grad(primary, params, create_graph=True)
    aux_grads = torch.autograd.grad(aux, params, create_graph=True)
    train_grads = maoal.weighted_gradients(list(primary_grads), list(aux_grads), lam, [0, 1, 2])
    dev_grads = torch.autograd.grad(regression_dev_loss(p, w), params)
    (grad,) = maoal.implicit_hypergradient(list(dev_grads), train_grads, params, [hyper], alpha, terms)
    return grad


LAMBDA = torch.tensor([0.3, 1.0, 2.5], dtype=F64)


def test_the_closed_form_is_the_derivative_of_the_developing_loss_at_the_fixed_point():
    """The oracle itself: the implicit gradient equals a central difference of L_dev(W*(lambda))."""
    p = regression_problem()
    exact = regression_exact_hypergradient(p, LAMBDA)
    step = 1e-6
    for b in range(3):
        shift = torch.zeros(3, dtype=F64)
        shift[b] = step
        difference = (
            regression_dev_loss(p, regression_fixed_point(p, LAMBDA + shift))
            - regression_dev_loss(p, regression_fixed_point(p, LAMBDA - shift))
        ) / (2 * step)
        assert difference.item() == pytest.approx(exact[b].item(), rel=1e-7, abs=1e-12)


def test_the_neumann_hypergradient_converges_to_the_implicit_gradient_as_terms_grow():
    p = regression_problem()
    exact = regression_exact_hypergradient(p, LAMBDA)
    n = len(p["y"])
    jacobian = (1 + LAMBDA[MODULE_OF_COORDINATE])[:, None] * (p["x"].T @ p["x"] / n)
    eigenvalues = torch.linalg.eigvals(jacobian)
    assert (eigenvalues.real > 0).all() and eigenvalues.imag.abs().max() < 1e-10
    alpha = 1 / eigenvalues.real.max().item()  # every eigenvalue of alpha H in (0, 1]: the series converges
    errors = [
        (
            (regression_script_hypergradient(p, LAMBDA.clone().requires_grad_(), alpha, terms) - exact).norm()
            / exact.norm()
        )
        for terms in (1, 3, 10, 30, 100, 400)
    ]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-9, errors


def test_the_neumann_hypergradient_is_exact_when_the_series_is():
    """X^T X / n = I and one lambda for every module: dg/dW = (1 + lambda) I, so with alpha = 1 / (1 + lambda)
    every term after the first vanishes and the truncated series is the inverse itself, for any number of terms."""
    p = regression_problem(orthonormal=True)
    lam = torch.full((3,), 0.6, dtype=F64)
    exact = regression_exact_hypergradient(p, lam)
    for terms in (1, 3):
        got = regression_script_hypergradient(p, lam.clone().requires_grad_(), 1 / 1.6, terms)
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-15)
    # An alpha that does not make the series exact gives another value: the test can fail.
    assert (
        regression_script_hypergradient(p, lam.clone().requires_grad_(), 0.5, 3) - exact
    ).norm() > 1e-3 * exact.norm()


def test_the_hypergradient_of_rho_is_lambdas_times_the_softplus_slope():
    p = regression_problem()
    rho = torch.tensor([-0.5, 0.2, 1.5], dtype=F64)
    lam = F.softplus(rho)
    got = regression_script_hypergradient(p, rho.clone().requires_grad_(), 1e-3, 3, softplus=True)
    by_lambda = regression_script_hypergradient(p, lam.clone().requires_grad_(), 1e-3, 3)
    torch.testing.assert_close(got, by_lambda * torch.sigmoid(rho), rtol=1e-12, atol=0)


def test_neumann_inverse_hvp_is_the_truncated_series_of_the_transposed_jacobian():
    """On g(w) = M w, a non-symmetric M: alpha * sum_j (I - alpha M^T)^j v, written out with dense matrices."""
    torch.manual_seed(0)
    m = torch.eye(4, dtype=F64) + 0.3 * torch.randn(4, 4, dtype=F64)
    w = torch.randn(4, dtype=F64, requires_grad=True)
    v = torch.randn(4, dtype=F64)
    alpha, terms = 0.4, 5
    got = maoal.neumann_inverse_hvp([m @ w], [w], [v], alpha, terms)[0]
    step = torch.eye(4, dtype=F64) - alpha * m.T
    expected = alpha * sum(torch.linalg.matrix_power(step, j) @ v for j in range(terms + 1))
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# The module-wise combination and the gcs rule


def test_weighted_gradients_scale_each_modules_auxiliary_gradient():
    primary = [torch.full((2,), 1.0), torch.full((3,), 2.0), torch.full((1,), 3.0)]
    aux = [torch.full((2,), 10.0), torch.full((3,), 20.0), torch.full((1,), 30.0)]
    got = maoal.weighted_gradients(primary, aux, torch.tensor([0.5, 0.0]), [0, 1, 0])
    for g, expected in zip(got, [6.0, 2.0, 18.0]):
        assert torch.equal(g, torch.full_like(g, expected))


def test_module_cosines_take_each_modules_tensors_as_one_vector():
    torch.manual_seed(0)
    primary = [torch.randn(3, 2), torch.randn(4), torch.randn(5), torch.zeros(2)]
    aux = [torch.randn(3, 2), torch.randn(4), -primary[2] * 2, torch.randn(2)]
    got = maoal.module_cosines(primary, aux, [0, 0, 1, 2], 3)
    torch.testing.assert_close(got[0], F.cosine_similarity(flat(primary[:2]), flat(aux[:2]), dim=0))
    assert got[1].item() == pytest.approx(-1.0)
    assert got[2].item() == 0.0  # a zero gradient: no direction, not positive


class TinyVGG(maoal.VGG16):
    """The VGG16 class's layout (block1..block5, classifier1, classifier2, its forward) at a few channels."""

    def __init__(self, num_primary: int, num_auxiliary: int, backbone: None = None, channels: int = 2):
        nn.Module.__init__(self)
        self.backbone, self.num_features = None, channels
        self.block1 = maoal.conv_block(3, channels, 1)
        for i in range(2, 6):
            setattr(self, f"block{i}", maoal.conv_block(channels, channels, 1))
        self.classifier1 = nn.Sequential(nn.Linear(channels, 4), nn.ReLU(), nn.Linear(4, num_primary))
        self.classifier2 = nn.Sequential(nn.Linear(channels, 4), nn.ReLU(), nn.Linear(4, num_auxiliary))
        maoal.init_weights(self, nn.init.xavier_uniform_)


def tiny_state(cfg, seed: int = 0, rho=None) -> dict:
    torch.manual_seed(seed)
    model = TinyVGG(cfg.primary_level, cfg.aux_level).double()
    weights = maoal.ModuleWeights(1, 5).double()
    if rho is not None:
        with torch.no_grad():
            weights.rho.copy_(torch.as_tensor(rho, dtype=F64))
    return {
        "model": model,
        "module_weights": weights,
        "optimizer": torch.optim.SGD(model.parameters(), lr=cfg.lr),
        "lambda_optimizer": torch.optim.SGD(weights.parameters(), lr=cfg.lambda_lr, momentum=cfg.lambda_momentum),
        "forward_model": model,
    }


def batch(n: int, seed: int, primary_level: int = 3, aux_level: int = 10, dtype=F64):
    """Images and their 4-level labels (random, but with the aux labels at `aux_level`, primary at `primary_level`)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g, dtype=dtype)
    labels = torch.zeros(n, 4, dtype=torch.long)
    labels[:, level_index(primary_level)] = torch.randint(0, primary_level, (n,), generator=g)
    labels[:, level_index(aux_level)] = torch.randint(0, aux_level, (n,), generator=g)
    return images, labels


TINY = maoal.check_config(maoal.Config(primary_level=3, aux_level=10, lr=0.1, lambda_lr=0.05, channels_last=False))


def expected_step(state: dict, images, labels, cfg, weights_of) -> tuple[dict, torch.Tensor]:
    """Parameters after one SGD step on g, computed here: per-parameter gradients of each loss taken apart,
    the trunk tensors of module b combined with weights_of(cosines)[b]."""
    model = state["model"]
    primary_logits, aux_logits = model(images)
    primary_loss, aux_loss = maoal.task_losses(primary_logits, aux_logits, labels, cfg)
    named = dict(model.named_parameters())
    primary_grads = dict(
        zip(named, torch.autograd.grad(primary_loss, list(named.values()), retain_graph=True, allow_unused=True))
    )
    aux_grads = dict(zip(named, torch.autograd.grad(aux_loss, list(named.values()), allow_unused=True)))
    cosines = torch.stack(
        [
            F.cosine_similarity(
                flat(primary_grads[k] for k in named if k.startswith(f"block{b}.")),
                flat(aux_grads[k] for k in named if k.startswith(f"block{b}.")),
                dim=0,
            )
            for b in range(1, 6)
        ]
    )
    global_cosine = F.cosine_similarity(
        flat(primary_grads[k] for k in named if k.startswith("block")),
        flat(aux_grads[k] for k in named if k.startswith("block")),
        dim=0,
    )
    weights = weights_of(cosines, global_cosine)
    after = {}
    for name, p in named.items():
        if name.startswith("block"):
            g = primary_grads[name] + weights[int(name[5]) - 1] * aux_grads[name]
        else:
            g = primary_grads[name] if name.startswith("classifier1") else aux_grads[name]
        after[name] = (p - cfg.lr * g).detach()
    return after, weights


WEIGHTS_OF = {
    "maoal": lambda cos, whole: F.softplus(torch.tensor([-2.0, 0.0, 0.5, 1.0, 3.0], dtype=F64)),
    # the paper's rule: one cosine over all the trunk's parameters decides for every module
    "gcs": lambda cos, whole: (whole > 0).to(F64).expand(5),
    "gcs-block": lambda cos, whole: (cos > 0).to(F64),  # each module's own cosine
}


@pytest.mark.parametrize("mode, seed", [("maoal", 5), ("gcs", 5), ("gcs", 7), ("gcs-block", 5)])
def test_the_lower_step_adds_each_modules_auxiliary_gradient_weighted(mode, seed):
    """maoal: g = grad L_pri + lambda_b grad L_aux in module b (lambda = softplus(rho), here unequal); gcs: the
    auxiliary gradient added in every module when its cosine with the primary one over the whole trunk is
    positive, in none otherwise; gcs-block: in exactly the modules whose own cosine is positive."""
    cfg = dataclasses.replace(TINY, mode=mode)
    state = tiny_state(cfg, rho=[[-2.0, 0.0, 0.5, 1.0, 3.0]])
    images, labels = batch(6, seed=seed)
    expected, weights = expected_step(state, images, labels, cfg, WEIGHTS_OF[mode])
    out = maoal.train_step(state, images, labels, cfg)
    for name, p in state["model"].named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-12, atol=1e-14, msg=name)
    reported = torch.stack([out[f"lambda_{m}"] for m in maoal.MODULES])
    torch.testing.assert_close(reported, weights)
    if mode == "gcs-block":
        assert 0 < int(weights.sum()) < 5, weights  # this batch has both kinds of module: the two rules differ


def test_the_gcs_gate_is_one_cosine_per_auxiliary_loss_by_hand():
    """Two modules, two auxiliary losses, by hand. Both auxiliary gradients point against the primary one in
    module 0 and with it in module 1 (cosines -1, +1). Over the whole trunk, loss 1's dot product is -4 + 3 < 0:
    off in every module; loss 2's is -1 + 15 > 0: on in every module. Per block both would be on in module 1 only."""
    primary = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]  # module 0, module 1
    aux1 = [torch.tensor([-4.0, 0.0]), torch.tensor([1.0, 0.0])]
    aux2 = [torch.tensor([-1.0, 0.0]), torch.tensor([5.0, 0.0])]
    gates = maoal.gcs_gates(primary, [aux1, aux2], [0, 1], 2)
    assert gates.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    per_block = maoal.gcs_gates(primary, [aux1, aux2], [0, 1], 2, per_block=True)
    assert per_block.tolist() == [[0.0, 1.0], [0.0, 1.0]]
    # the combined gradient: primary plus aux2 everywhere, aux1 nowhere
    got = maoal.combined_gradients(primary, [aux1, aux2], gates, [0, 1])
    assert [g.tolist() for g in got] == [[0.0, 0.0], [8.0, 0.0]]


# ---------------------------------------------------------------------------------------------
# The hypergradient on the network, against dense Jacobians


def dense_hypergradient(state: dict, train_images, train_labels, dev_images, dev_labels, cfg) -> torch.Tensor:
    """-(dg/drho)^T * alpha * sum_j (I - alpha H^T)^j dL_dev/dW with H = dg/dW written out as a dense matrix,
    g built here from its definition (trunk: g_pri + softplus(rho)_b g_aux; heads: their own loss)."""
    model = state["model"]
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def unflatten(w):
        return {n: chunk.view(s) for n, chunk, s in zip(names, torch.split(w, sizes), shapes)}

    def losses(w, images, labels):
        fresh = {name: b.clone() for name, b in buffers.items()}
        return maoal.task_losses(*functional_call(model, (unflatten(w), fresh), (images,)), labels, cfg)

    def g(w, rho):
        primary_loss, aux_loss = losses(w, train_images, train_labels)
        primary = torch.autograd.grad(primary_loss, w, create_graph=True)[0]
        aux = torch.autograd.grad(aux_loss, w, create_graph=True)[0]
        lam = F.softplus(rho)[0]
        zero, one = torch.zeros((), dtype=F64), torch.ones((), dtype=F64)

        def loss_weights(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            """The weights of the primary and of the auxiliary gradient in g, for this parameter."""
            if name.startswith("block"):
                return one, lam[int(name[5]) - 1]
            return (one, zero) if name.startswith("classifier1") else (zero, one)

        weights = [loss_weights(name) for name in names]
        primary_weight = torch.cat([weight.expand(size) for (weight, _), size in zip(weights, sizes)])
        aux_weight = torch.cat([weight.expand(size) for (_, weight), size in zip(weights, sizes)])
        return primary_weight * primary + aux_weight * aux

    w0 = flat(p.detach() for p in model.parameters()).requires_grad_()
    rho0 = state["module_weights"].rho.detach().clone()
    h, dg_drho = torch.autograd.functional.jacobian(g, (w0, rho0), vectorize=True)
    dg_drho = dg_drho.reshape(len(w0), -1)
    dev_loss = losses(w0, dev_images, dev_labels)[0]
    v = torch.autograd.grad(dev_loss, w0)[0]
    step = torch.eye(len(w0), dtype=F64) - cfg.neumann_alpha * h.T
    series = sum(torch.linalg.matrix_power(step, j) @ v for j in range(cfg.neumann_terms + 1))
    return -(dg_drho.T @ (cfg.neumann_alpha * series)).reshape(rho0.shape)


@pytest.fixture(scope="module")
def hyper_setup():
    cfg = dataclasses.replace(TINY, neumann_terms=2, neumann_alpha=0.3, authors_neumann_sum=False)
    state = tiny_state(cfg, rho=[[-1.0, 0.0, 0.5, 1.0, 2.0]])
    train_images, train_labels = batch(5, seed=2)
    dev_images, dev_labels = batch(4, seed=3)
    return cfg, state, (train_images, train_labels, dev_images, dev_labels)


def test_the_networks_hypergradient_equals_the_dense_computation(hyper_setup):
    """Every parameter of the network is W (both heads included), g as defined, the developing loss on the primary
    head, lambda through softplus: against dense Jacobians of a g built independently."""
    cfg, state, batches = hyper_setup
    grads, dev_loss, dev_acc = maoal.hypergradient(state["model"], state["module_weights"], *batches, cfg)
    expected = dense_hypergradient(state, *batches, cfg)
    torch.testing.assert_close(grads[0], expected, rtol=1e-9, atol=1e-13)
    assert grads[0].abs().min() > 0  # every module's entry is informative


def test_the_meta_step_moves_rho_by_the_clipped_hypergradient_and_nothing_else(hyper_setup):
    cfg, state, batches = hyper_setup
    model = state["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}  # parameters and running statistics
    rho = state["module_weights"].rho.detach().clone()
    grads, _, _ = maoal.hypergradient(model, state["module_weights"], *batches, cfg)
    clip = grads[0].norm().item() / 4  # so that clipping acts
    stats = maoal.meta_step(state, *batches, dataclasses.replace(cfg, hypergrad_clip=clip))
    assert stats["hypergrad_norm"].item() == pytest.approx(grads[0].norm().item(), rel=1e-12)
    clipped = grads[0] * clip / (grads[0].norm() + 1e-6)  # torch's clip_grad_norm_ rule
    # The first SGD step with momentum: its buffer starts as the gradient itself.
    torch.testing.assert_close(state["module_weights"].rho.detach(), rho - cfg.lambda_lr * clipped, rtol=0, atol=1e-15)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        state["module_weights"].rho.copy_(rho)  # the module fixture is shared


# ---------------------------------------------------------------------------------------------
# equal and single: the other scripts' steps, on the real VGG-16


def real_states(mode: str, other) -> tuple[dict, dict, object, object]:
    """Our state in `mode` and the other script's, with the same initial network."""
    cfg = maoal.check_config(maoal.Config(mode=mode, primary_level=20, aux_level=100, batch_size=4))
    torch.manual_seed(0)
    ours = maoal.build(cfg, torch.device("cpu"))
    other_cfg = other.check_config(other.Config(batch_size=4))
    theirs = other.build(other_cfg, torch.device("cpu"))
    state_dict = ours["model"].state_dict()
    if other is single:
        state_dict = {
            k.replace("classifier1.", "classifier."): v for k, v in state_dict.items() if "classifier2" not in k
        }
    theirs["model"].load_state_dict(state_dict)
    return ours, theirs, cfg, other_cfg


def real_batch(n: int = 4, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch(n, seed, primary_level=20, aux_level=100, dtype=torch.float32)
    return images.contiguous(memory_format=torch.channels_last), labels


def test_equal_is_the_human_scripts_step_bit_for_bit():
    ours, theirs, cfg, human_cfg = real_states("equal", human)
    images, labels = real_batch()
    out = maoal.train_step(ours, images, labels, cfg)
    human_out = human.train_step(theirs, images, labels, human_cfg)
    for (name, p), (_, q) in zip(ours["model"].named_parameters(), theirs["model"].named_parameters(), strict=True):
        assert torch.equal(p, q), name
    for key in human_out:
        assert torch.equal(out[key], human_out[key]), key
    assert all(out[f"lambda_{m}"].item() == 1.0 for m in maoal.MODULES)


def test_single_is_the_single_scripts_step_on_the_trunk_and_primary_head():
    """The trunk and the primary head take Single's step bit for bit; the auxiliary head learns on the detached
    features (its own loss's gradient), sending nothing into the trunk."""
    ours, theirs, cfg, single_cfg = real_states("single", single)
    images, labels = real_batch()
    aux_head = ours["model"].classifier2
    features = ours["model"].features(images).detach()
    aux_loss = maoal.task_losses(ours["model"].classifier1(features), aux_head(features), labels, cfg)[1]
    expected_aux_head = [
        (p - cfg.lr * g).detach()
        for p, g in zip(aux_head.parameters(), torch.autograd.grad(aux_loss, list(aux_head.parameters())))
    ]
    out = maoal.train_step(ours, images, labels, cfg)
    single_out = single.train_step(theirs, images, labels, single_cfg)
    theirs_named = dict(theirs["model"].named_parameters())
    for name, p in ours["model"].named_parameters():
        if not name.startswith("classifier2"):
            assert torch.equal(p, theirs_named[name.replace("classifier1.", "classifier.")]), name
    for p, expected in zip(aux_head.parameters(), expected_aux_head):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
    for key in ("train_primary_loss", "train_primary_acc"):
        assert torch.equal(out[key], single_out[key]), key
    assert all(out[f"lambda_{m}"].item() == 0.0 for m in maoal.MODULES)


def test_maoal_at_lambda_one_is_the_human_step_up_to_rounding():
    """The two-gradient path of maoal and gcs, lambda = 1: Human's step (its train_step on the same network), in
    float64 to 1e-12."""
    cfg = dataclasses.replace(TINY, mode="maoal")
    ours = tiny_state(cfg, rho=[[math.log(math.expm1(1.0))] * 5])
    model = TinyVGG(cfg.primary_level, cfg.aux_level).double()
    model.load_state_dict(ours["model"].state_dict())
    theirs = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=cfg.lr), "forward_model": model}
    images, labels = batch(6, seed=5)
    maoal.train_step(ours, images, labels, cfg)
    human.train_step(theirs, images, labels, human.Config(primary_level=3, aux_level=10, lr=cfg.lr))
    for (name, p), (_, q) in zip(ours["model"].named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)


# ---------------------------------------------------------------------------------------------
# The developing set


def test_dev_quotas_are_proportional_and_sum_to_the_size():
    assert maoal.dev_quotas(np.array([5, 3, 2]), 4).tolist() == [2, 1, 1]
    assert maoal.dev_quotas(np.array([10] * 20), 45).tolist() == [3] * 5 + [2] * 15  # ties go to the lower class
    counts = np.array([2500, 750, 1750])
    quotas = maoal.dev_quotas(counts, 500)
    assert quotas.sum() == 500
    assert (np.abs(quotas - 500 * counts / counts.sum()) < 1).all()


@pytest.fixture(scope="module")
def train_set(data_root) -> CIFAR100:
    return CIFAR100(data_root, train=True)


@pytest.mark.parametrize("primary_level", [20, 3])
def test_the_developing_set_is_stratified_and_drawn_from_the_seed(train_set, primary_level):
    aux_level = 100
    cfg = maoal.Config(primary_level=primary_level, aux_level=aux_level, dev_size=45)
    dev = maoal.held_out(train_set, cfg)
    primary = train_set.labels[:, level_index(primary_level)].numpy()
    counts = np.bincount(primary, minlength=primary_level)
    assert len(dev) == len(set(dev.tolist())) == 45
    dev_counts = np.bincount(primary[dev], minlength=primary_level)
    assert (np.abs(dev_counts - 45 * counts / counts.sum()) < 1).all(), dev_counts
    assert np.array_equal(maoal.held_out(train_set, cfg), dev)
    assert not np.array_equal(maoal.held_out(train_set, dataclasses.replace(cfg, seed=1)), dev)


def maoal_loaders(cfg) -> create_dataset.Loaders:
    """The loaders of a run of `cfg`, made as main() makes them: the data split by task, the developing set held
    out of the training set."""
    train, test = create_dataset.load_datasets(cfg)
    train, test, auxiliary = maoal.split_data(train, test, cfg)
    train, dev = train.split(maoal.held_out(train, cfg), held_out_transform=test.transform)
    return create_dataset.make_loaders(cfg, torch.device("cpu"), train, test, dev, auxiliary)


def test_the_developing_set_is_out_of_the_training_batches(data_root, train_set):
    cfg = maoal.check_config(
        maoal.Config(data_root=str(data_root), download=False, device="cpu", workers=0, batch_size=30, dev_size=45)
    )
    loaders = maoal_loaders(cfg)
    dev_rows = {row.tobytes() for row in train_set.data[maoal.held_out(train_set, cfg)]}
    train_rows = {row.tobytes() for row in loaders.train.dataset.data}
    assert len(dev_rows) == 45 and len(train_rows) == 155 and not dev_rows & train_rows
    assert {row.tobytes() for row in loaders.dev.dataset.data} == dev_rows
    assert sum(len(labels) for _, labels in loaders.train) == 155
    assert sum(len(labels) for _, labels in loaders.dev) == 45


# ---------------------------------------------------------------------------------------------
# End to end


def flags(data_root, results, *extra) -> list[str]:
    return ["--data-root", str(data_root), "--results-dir", str(results), *FAST, *extra]


LAMBDA_KEYS = {f"lambda_{m}" for m in maoal.MODULES}
DEV_KEYS = {"dev_primary_loss", "dev_primary_acc", "hypergrad_norm"}


def history(results, name) -> list[dict]:
    epochs = json.loads((results / name / "metrics.json").read_text())["epochs"]
    return [{k: v for k, v in record.items() if k != "seconds"} for record in epochs]


def test_one_maoal_epoch_from_the_command_line(data_root, tmp_path):
    """Results, the epoch line, lambda and its optimiser in the checkpoint; lambda moved by the meta step."""
    result = run_main(
        maoal,
        *flags(data_root, tmp_path, "--epochs", "1", "--limit-batches", "1", "--batch-size", "2", "--dev-size", "20"),
        *("--meta-every", "1", "--neumann-terms", "1", "--run-name", "cli"),
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("epoch   1/1"))
    assert re.search(r"\| lambda( \d\.\d{3}){5} \| dev pri \S+ +\S+% hypergrad \S+ \| test pri", line), line
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["config"]["method"] == "maoal" and metrics["config"]["mode"] == "maoal"
    assert metrics["config"]["lambda_modules"] == list(maoal.MODULES)
    (record,) = metrics["epochs"]
    assert LAMBDA_KEYS | DEV_KEYS <= set(record)
    assert all(abs(record[k] - 1) < 1e-6 for k in LAMBDA_KEYS)  # the epoch's one step ran at the initial lambda
    assert metrics["summary"]["published_test_primary_acc"] == {}
    checkpoint = torch.load(tmp_path / "cli" / "checkpoint.pt", weights_only=True)
    assert set(checkpoint["module_weights"]) == {"rho"} and checkpoint["lambda_optimizer"]["state"]
    assert (F.softplus(checkpoint["module_weights"]["rho"]) - 1).abs().max() > 1e-4  # the meta step moved lambda


def test_resume_repeats_an_uninterrupted_run_exactly(data_root, tmp_path, monkeypatch):
    """lambda, its momentum and the developing loader's RNG come back from the checkpoint. On the small network
    of the VGG's layout (the run machinery is the same for any network): three epochs of three steps, a meta
    step after every second one."""
    monkeypatch.setattr(maoal, "VGG16", functools.partial(TinyVGG, channels=4))  # at 2, ReLUs die on this data
    common = flags(data_root, tmp_path, "--limit-batches", "3", "--batch-size", "4", "--dev-size", "20")
    common += ["--meta-every", "2", "--neumann-terms", "2", "--neumann-alpha", "0.5", "--lambda-lr", "0.1"]
    assert run_main(maoal, *common, "--epochs", "3", "--run-name", "straight").returncode == 0
    assert run_main(maoal, *common, "--epochs", "1", "--run-name", "split").returncode == 0
    resumed = run_main(maoal, *common, "--epochs", "3", "--run-name", "split", "--resume")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    straight, split = history(tmp_path, "straight"), history(tmp_path, "split")
    assert len(split) == 3 and split == straight
    assert len({record["lambda_block1"] for record in straight}) == 3  # lambda moved: the test can fail
    final = {name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("straight", "split")}
    assert torch.equal(final["split"]["module_weights"]["rho"], final["straight"]["module_weights"]["rho"])
    buffers = [final[name]["lambda_optimizer"]["state"][0]["momentum_buffer"] for name in final]
    assert torch.equal(*buffers)


def build_from_maoals_initial_network(other):
    """The other script's build, its network loaded with the parameters our build draws from the same seed, and
    the global RNG (the DataLoader's augmentation draws from it) left where our build leaves it: Single's network
    lacks the auxiliary head, whose default initialisation takes draws before the xavier pass."""
    other_build = other.build

    def build(cfg, device):
        state = other_build(cfg, device)
        torch.manual_seed(cfg.seed)  # main() seeds (run.open), loads data (no draws), then builds: the same state
        initial = maoal.VGG16(cfg.primary_level, maoal.Config().aux_level).state_dict()
        if other is single:
            initial = {
                k.replace("classifier1.", "classifier."): v for k, v in initial.items() if "classifier2" not in k
            }
        state["model"].load_state_dict(initial)
        return state

    return build


@pytest.mark.parametrize("mode, other", [("equal", human), ("single", single)], ids=["equal-human", "single-single"])
def test_a_baseline_mode_trains_as_the_other_script_on_the_same_images(data_root, tmp_path, monkeypatch, mode, other):
    """An epoch of two batches, MAOAL's developing set held out of the other script's training set too: every
    number the other script records is the same, bit for bit."""
    common = flags(data_root, tmp_path, "--batch-size", "4", "--epochs", "1", "--limit-batches", "2")
    assert run_main(maoal, *common, "--mode", mode, "--dev-size", "20", "--run-name", "ours").returncode == 0
    maoal_cfg = maoal.check_config(maoal.Config(mode=mode, dev_size=20))
    datasets = experiment.Run.datasets

    def without_maoals_developing_set(run):
        train_set, test_set = datasets(run)
        return train_set.split(maoal.held_out(train_set, maoal_cfg))[0], test_set

    monkeypatch.setattr(experiment.Run, "datasets", without_maoals_developing_set)
    monkeypatch.setattr(other, "build", build_from_maoals_initial_network(other))
    assert run_main(other, *common, "--run-name", "theirs").returncode == 0
    (ours,), (theirs,) = history(tmp_path, "ours"), history(tmp_path, "theirs")
    assert {k: ours[k] for k in theirs} == theirs


def test_the_developing_set_is_held_out_in_every_mode(data_root, tmp_path, monkeypatch):
    """main() hands the loaders a training set without the developing set in every mode, so that all train on
    the same images (caught there, before anything is built)."""

    class Handed(Exception):
        pass

    def make_loaders(cfg, device, train_set, test_set, dev_set=None, auxiliary_sets=()):
        raise Handed(len(train_set), len(dev_set))

    monkeypatch.setattr(create_dataset, "make_loaders", make_loaders)
    for mode in maoal.MODES:
        with pytest.raises(Handed) as handed:
            run_main(maoal, *flags(data_root, tmp_path, "--mode", mode, "--dev-size", "30", "--batch-size", "50"))
        assert handed.value.args == (170, 30), mode


# ---------------------------------------------------------------------------------------------
# Refused input


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--dev-size", "300"], "--dev-size 300 is more than this training set allows"),
        (["--dev-size", "200"], "class 0 has 10 training images and its share would be 10, leaving it none"),
        (["--dev-size", "0"], "--dev-size must be at least 1 (got 0)"),
        (["--neumann-terms", "0"], "--neumann-terms must be at least 1 (got 0)"),
        (["--meta-every", "0"], "--meta-every must be at least 1 (got 0)"),
        (["--neumann-alpha", "0"], "--neumann-alpha must be positive"),
        (["--hypergrad-clip", "-1"], "--hypergrad-clip must be positive"),
        (["--lambda-lr", "0"], "--lambda-lr must be positive"),
        (["--lambda-momentum", "-0.5"], "--lambda-momentum must be 0 or more"),
        (["--mode", "gcs-global"], "argument --mode: invalid choice: 'gcs-global'"),
        (["--primary-level", "20", "--aux-level", "20"], "--aux-level 20 must be finer than --primary-level 20"),
    ],
)
def test_impossible_settings_are_refused_and_nothing_is_written(data_root, tmp_path, extra, phrase):
    result = run_main(maoal, *flags(data_root, tmp_path / "results", "--epochs", "1", *extra))
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
    assert "Traceback" not in result.stderr and not (tmp_path / "results").exists()


def test_a_diverging_neumann_series_stops_the_run_with_a_hint_about_it(data_root, tmp_path):
    """A step far too large for the Hessian: the series overflows, and the line names the Neumann settings,
    not the learning rate. The first epoch had not finished, so nothing is written."""
    result = run_main(
        maoal,
        *flags(data_root, tmp_path / "results", "--epochs", "1", "--limit-batches", "1", "--batch-size", "2"),
        *("--dev-size", "20", "--meta-every", "1", "--neumann-alpha", "1e12", "--neumann-terms", "8"),
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: non-finite hypergradient at epoch 1"), lines
    assert "nothing was saved" in lines[0] and "try a smaller --neumann-alpha" in lines[0], lines
    assert "--lr" not in lines[0] and not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------
# Run names

RUN_ONLY = {
    "epochs",
    "resume",
    "overwrite",
    "data_root",
    "download",
    "workers",
    "cuda_graphs",
    "results_dir",
    "run_name",
    "smoke",
    "device",
    "data_path",
    "deterministic",
    "compile",
    "channels_last",
    "limit_batches",
    "tensorboard",
}
# What MAOAL refuses to change (CIFAR-100 and VGG-16 only), or a setting for ResNets: never in its names.
FIXED = {"dataset", "backbone", "stem", "pretrained"}
EDITS = {
    "image_size": 64,
    "train_fraction": 0.5,
    "primary_level": 10,
    "aux_level": 20,
    "mode": "gcs",
    "batch_size": 50,
    "lr": 0.02,
    "lr_step": 40,
    "lr_gamma": 0.1,
    "focal_gamma": 0.0,
    "dev_size": 1000,
    "meta_every": 5,
    "neumann_terms": 5,
    "neumann_alpha": 0.1,
    "lambda_lr": 5e-3,
    "lambda_momentum": 0.0,
    "hypergrad_clip": 1.0,
    "amp": True,
    "seed": 1,
}
EDITS |= {
    "momentum": 0.5,
    "weight_decay": 1e-4,
    "lr_schedule": "cosine",
    "authors_neumann_sum": False,
    "lambda_activation": "relu",
    "lambda_optimizer": "adam",
    "lambda_weight_decay": 1e-3,
    "combiner_hidden": "3",
    "combiner_lr": 1e-2,
    "combiner_momentum": 0.0,
    "combiner_weight_decay": 0.0,
    "combiner_alpha": 1e-3,
    "target_domain": 15,
    "aux_domains": "0-4",
    "renormalize": False,
    "dev_fraction": 0.1,
    "aux_reduction": "mean",
}
SHARED_UPPER = {"meta_every", "neumann_terms", "hypergrad_clip", "authors_neumann_sum"}  # maoal's and aux's
UPPER_LEVEL = SHARED_UPPER | {
    "neumann_alpha", "lambda_lr", "lambda_momentum", "lambda_activation", "lambda_optimizer", "lambda_weight_decay"
}  # fmt: skip
COMBINER = {"combiner_hidden", "combiner_lr", "combiner_momentum", "combiner_weight_decay", "combiner_alpha"}
HIERARCHY_ONLY = {"primary_level", "aux_level", "dev_size", "lr_step", "lr_gamma"}
DOMAINS_ONLY = {"target_domain", "aux_domains", "renormalize", "dev_fraction", "aux_reduction"}


def run_name(cfg: maoal.Config, script=maoal) -> str:
    """The default run name of a checked config."""
    return experiment.run_name(cfg, script.run_name_stem(cfg), script.paper_settings(cfg))


def name(**changes) -> str:
    return run_name(maoal.check_config(maoal.Config(**changes)))


def test_the_default_names_carry_the_mode():
    assert name() == "maoal-maoal-pri20-aux100-seed0"
    assert name(mode="equal", seed=2) == "maoal-equal-pri20-aux100-seed2"
    assert name(mode="single", primary_level=3, aux_level=10) == "maoal-single-pri3-aux10-seed0"
    assert name(task="domains") == "maoal-maoal-domain14-aux0-9-seed0"
    assert name(task="domains", mode="aux", aux_domains="0,3") == "maoal-aux-domain14-aux0_3-seed0"
    # the authors' ResNet-18 is the domains task's own network: only another one is written
    assert name(task="domains", backbone="resnet18") == name(task="domains")
    assert name(task="domains", backbone="vgg16") == "maoal-maoal-domain14-aux0-9-seed0-vgg16"
    assert name(task="domains", backbone="resnet18", pretrained=True) == "maoal-maoal-domain14-aux0-9-seed0-pretrained"


def counts(field: str, mode: str, task: str) -> bool:
    """Whether changing `field` must change the run name in this mode and task."""
    if field in (DOMAINS_ONLY if task == "hierarchy" else HIERARCHY_ONLY):
        return False
    if task == "domains" and field == "lambda_momentum":
        return False  # the domains' lambda optimiser is Adam
    if task == "domains" and field == "aux_reduction":
        return mode != "aux"  # the combiner takes the losses one by one
    if field in SHARED_UPPER:
        return mode in ("maoal", "aux")
    if field in UPPER_LEVEL:
        return mode == "maoal"
    if field in COMBINER:
        return mode == "aux"
    return True


@pytest.mark.parametrize("task", maoal.TASKS)
@pytest.mark.parametrize("mode", maoal.MODES)
def test_every_setting_is_in_the_name_or_never_changes_it(mode, task):
    """Every setting that changes the result changes the name; a setting of another mode's upper level or of the
    other task is refused (experiment.only_with), or leaves the name alone."""
    for field in experiment.fields(maoal.Config):
        if field.name in RUN_ONLY | FIXED or field.name in ("mode", "task"):
            continue
        assert field.name in EDITS, f"no test value for {field.name}"
        base = {"mode": mode, "task": task} | ({"primary_level": 3} if field.name == "aux_level" else {})
        edit = EDITS[field.name]
        if task == "domains" and field.name == "aux_reduction" and mode == "maoal":
            edit = "sum"  # its paper value in maoal mode is mean
        if task == "domains" and field.name in ("lr_schedule", "lambda_optimizer"):
            edit = {"lr_schedule": "step", "lambda_optimizer": "sgd"}[field.name]  # the domains' paper values differ
        if task == "domains" and field.name == "focal_gamma":
            edit = 2.0
        if counts(field.name, mode, task):
            assert name(**base, **{field.name: edit}) != name(**base), (mode, task, field.name)
            continue
        try:  # a setting this mode or task does not use is refused (one it would not use anyway leaves the name)
            assert name(**base, **{field.name: edit}) == name(**base), (mode, task, field.name)
        except experiment.UsageError as error:
            assert "only, which this run is not" in str(error), (mode, task, field.name)


def test_edited_settings_add_a_stable_hash():
    edited = name(neumann_alpha=0.1)
    assert re.fullmatch(r"maoal-maoal-pri20-aux100-seed0-[0-9a-f]{8}", edited)
    assert name(neumann_alpha=0.1) == edited and name(neumann_alpha=0.2) != edited
    cfg = maoal.check_config(maoal.Config(dev_size=100, mode="equal"))
    assert experiment.edited_settings(cfg, maoal.paper_settings(cfg)) == {"dev_size": 100}


@pytest.mark.parametrize(
    "edits, argv",
    [
        (dict(primary_level=3, aux_level=10), ["--primary-level", "3", "--aux-level", "10"]),
        (dict(mode="gcs", primary_level=10), ["--mode", "gcs", "--primary-level", "10"]),
        (dict(task="domains"), ["--task", "domains"]),
        (dict(task="domains", mode="equal"), ["--task", "domains", "--mode", "equal"]),
    ],
)
def test_a_setting_edited_in_config_is_the_same_as_its_flag(edits, argv):
    """Editing primary_level, mode or task in Config is passing its flag: the same checked config (the defaults
    derived from them too: the task's batch size and network, the domains' auxiliary reduction by mode) and the
    same run name."""
    edited = maoal.check_config(maoal.Config(**edits))
    flagged = maoal.check_config(experiment.parse_flags(maoal.Config, argv))
    assert experiment.settings(edited) == experiment.settings(flagged)
    assert run_name(edited) == run_name(flagged) != name()


def test_a_refusal_names_the_setting_as_it_was_set():
    """A flag by its flag, as docs/reliability.md shows it; a Config edit by its field; a default left to the
    script as the default."""
    flagged = experiment.parse_flags(maoal.Config, ["--primary-level", "20", "--aux-level", "20"])
    with pytest.raises(experiment.UsageError, match=r"^--aux-level 20 must be finer than --primary-level 20 "):
        maoal.check_config(flagged)
    with pytest.raises(experiment.UsageError) as refused:
        maoal.check_config(maoal.Config(aux_level=20))
    assert str(refused.value) == ("aux_level = 20 in Config must be finer than primary_level 20 (choose from 100)")
    with pytest.raises(experiment.UsageError, match=r"^aux_domains = '0-14' in Config: each once, and not "):
        maoal.check_config(maoal.Config(task="domains", aux_domains="0-14"))


def test_settings_that_cannot_change_the_result_never_change_the_name():
    changes = dict(epochs=3, workers=0, data_root="elsewhere", download=False, cuda_graphs=False, device="cpu")
    changes |= dict(deterministic=True, compile=True, channels_last=False, data_path="loader", results_dir="r")
    assert name(**changes) == name()


def test_config_defaults_are_the_recorded_settings():
    cfg = maoal.check_config(maoal.Config())
    for key, value in maoal.paper_settings(cfg).items():
        assert getattr(cfg, key) == value, key
    assert UPPER_LEVEL <= set(maoal.paper_settings(cfg)) and "dev_size" in maoal.paper_settings(cfg)


def test_a_default_edited_in_the_file_gives_a_new_name(tmp_path):
    source = (REPO / "model_vgg_maoal.py").read_text()
    edited = source.replace("hypergrad_clip: float = option(10.0,", "hypergrad_clip: float = option(5.0,", 1)
    assert edited != source
    path = tmp_path / "model_vgg_maoal_edited.py"
    path.write_text(edited)
    spec = importlib.util.spec_from_file_location("model_vgg_maoal_edited", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up while building Config
    try:
        spec.loader.exec_module(module)
        assert run_name(module.check_config(module.Config()), module) == name(hypergrad_clip=5.0)
    finally:
        del sys.modules[spec.name]
