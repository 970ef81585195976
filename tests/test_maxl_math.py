"""The mathematics of MAXL (model_vgg_maxl.py): the meta-gradient of the label generator, the mask
softmax, the entropy regulariser and the gradient-cosine diagnostic.

The oracle for the meta-gradient is the reference's own way (method="double-backward": differentiate
through the inner gradient with create_graph) and, independently, a central finite difference of the
unrolled objective J(theta_2) = L_pri(theta_1^+(theta_2)) + entropy_weight * negative_entropy, built
here from torch.func.functional_call and autograd.grad. The networks are the real VGG-16s in float64
on a batch of four 32x32 images (BatchNorm in train mode, i.e. batch statistics, as in training).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import experiment
import model_vgg_maxl as maxl
from create_dataset import FINE_TO_COARSE, hierarchy_labels, hierarchy_psi

# One worker runs the whole module: its cached float64 meta-gradients are computed once, not on each worker.
pytestmark = pytest.mark.xdist_group("maxl_math")

F64 = torch.float64
PSI = [2, 3, 1]  # primary_level 3 with unequal blocks
INNER_LR = 0.1  # large enough that the second-order term dominates the entropy term
ENTROPY_WEIGHT = 0.2
METHODS = ("second-order", "finite-difference", "double-backward")
# Step of the finite difference of J along a unit-norm direction of theta_2 (15M parameters). J is
# strongly curved after an inner step of 0.1 on a random VGG (J ~ 25): steps of 1e-6 and more cross
# ReLU/max-pool kinks and give errors of 1e-4..1e-3; at 1e-7 the error is ~1e-6 and the float64
# rounding noise of J (~3e-14) is still 1e-5 of the difference.
FD_STEP_J = 1e-7


# ---------------------------------------------------------------------------------------------
# Helpers


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


def focal_formula(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """-sum_c t_c (1 - p_c)^gamma log p_c, averaged over the batch; differentiable, in the input's dtype."""
    log_p = F.log_softmax(logits, dim=1)
    return -(target * (1 - log_p.exp()) ** gamma * log_p).sum(1).mean()


def snapshot(copy: bool, **modules) -> dict:
    """Every parameter, .grad, buffer and mode flag (keys like 'model.param.block1.0.weight'), copied or live."""
    keep = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    state = {}
    for net_name, net in modules.items():
        state[f"{net_name}.training"] = [m.training for m in net.modules()]
        state[f"{net_name}.hooks"] = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules()]
        for name, p in net.named_parameters():
            state[f"{net_name}.param.{name}"] = keep(p)
            state[f"{net_name}.requires_grad.{name}"] = p.requires_grad
            state[f"{net_name}.grad.{name}"] = None if p.grad is None else keep(p.grad)
        for name, b in net.named_buffers():
            state[f"{net_name}.buffer.{name}"] = keep(b)
    return state


def changed(before: dict, after: dict) -> list[str]:
    """Keys whose values are not bit-identical (dtype included)."""
    out = []
    for key, a in before.items():
        b = after[key]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            same = (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype
                and a.shape == b.shape
                and torch.equal(a, b)
            )
        else:
            same = a == b
        if not same:
            out.append(key)
    return out


class MetaRuns:
    """meta_gradients on one setup, each configuration computed once, with the networks' state around each call."""

    def __init__(self, setup: SimpleNamespace):
        self.setup = setup
        self.cache: dict[tuple, SimpleNamespace] = {}

    def __call__(
        self, method, inner_lr=INNER_LR, entropy_weight=ENTROPY_WEIGHT, fd_step=0.01, aux_weight=1.0
    ) -> SimpleNamespace:
        key = (method, inner_lr, entropy_weight, fd_step, aux_weight)
        if key not in self.cache:
            s = self.setup
            before = snapshot(True, model=s.model, generator=s.generator)
            grads, stats = maxl.meta_gradients(
                model=s.model,
                label_generator=s.generator,
                images=s.x,
                primary=s.y,
                inner_lr=inner_lr,
                method=method,
                entropy_weight=entropy_weight,
                focal_gamma=2.0,
                fd_step=fd_step,
                aux_weight=aux_weight,
            )
            changes = changed(before, snapshot(False, model=s.model, generator=s.generator))
            del before
            self.cache[key] = SimpleNamespace(
                flat=flat(grads), shapes=[g.shape for g in grads], stats=stats, changes=changes
            )
        return self.cache[key]


def make_setup(psi: list[int], y: list[int], seed: int) -> SimpleNamespace:
    torch.manual_seed(seed)
    model = maxl.VGG16(psi).to(F64).train()
    generator = maxl.LabelGenerator(psi).to(F64).train()
    x = torch.randn(len(y), 3, 32, 32, dtype=F64)
    for net in (model, generator):
        # Non-trivial running statistics and pre-existing .grad on every other parameter: all must survive.
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
        for i, p in enumerate(net.parameters()):
            if i % 2 == 0:
                p.grad = torch.randn_like(p)
    s = SimpleNamespace(model=model, generator=generator, x=x, y=torch.tensor(y), psi=psi)
    s.runs = MetaRuns(s)
    return s


@pytest.fixture(scope="module")
def small() -> SimpleNamespace:
    """psi = [2, 3, 1] (primary level 3), four images covering every primary class."""
    return make_setup(PSI, [0, 1, 2, 1], seed=0)


@pytest.fixture(scope="module")
def default_psi() -> SimpleNamespace:
    """The paper's psi = [5] * 20 (primary 20, auxiliary 100)."""
    return make_setup([5] * 20, [3, 7, 19, 7], seed=1)


def generator_labels(s: SimpleNamespace, gen_params: dict) -> torch.Tensor:
    """The generator's labels at theta_2 = gen_params, batch statistics, its running stats untouched."""
    buffers = {k: b.clone() for k, b in s.generator.named_buffers()}
    return functional_call(s.generator, (gen_params, buffers), (s.x, s.y))


def unrolled_objective(s: SimpleNamespace, gen_params: dict, aux_weight: float = 1.0) -> float:
    """J(theta_2) = L_pri(theta_1^+) + entropy_weight * sum q log q, with
    theta_1^+ = theta_1 - inner_lr * grad_theta_1 (L_pri + aux_weight * L_aux(labels(theta_2)))."""
    target = F.one_hot(s.y, len(s.psi)).to(F64)
    with torch.no_grad():
        labels = generator_labels(s, gen_params)
    theta1 = {k: p.detach().clone().requires_grad_() for k, p in s.model.named_parameters()}
    buffers = {k: b.clone() for k, b in s.model.named_buffers()}
    primary_logits, aux_logits = functional_call(s.model, (theta1, buffers), (s.x,))
    train_loss = focal_formula(primary_logits, target) + aux_weight * focal_formula(aux_logits, labels)
    grads = torch.autograd.grad(train_loss, list(theta1.values()))
    with torch.no_grad():
        theta1_plus = {k: p - INNER_LR * g for (k, p), g in zip(theta1.items(), grads)}
        primary_plus, _ = functional_call(s.model, (theta1_plus, buffers), (s.x,))
        q = labels.mean(0)
        return (focal_formula(primary_plus, target) + ENTROPY_WEIGHT * (q * q.log()).sum()).item()


@pytest.fixture(scope="module")
def entropy_gradient(small) -> torch.Tensor:
    """grad_theta_2 of entropy_weight * sum q log q alone (flat), by autograd on functional_call."""
    params = dict(small.generator.named_parameters())
    q = generator_labels(small, params).mean(0)
    return flat(torch.autograd.grad(ENTROPY_WEIGHT * (q * q.log()).sum(), list(params.values())))


# ---------------------------------------------------------------------------------------------
# The meta-gradient


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_path_tangent_equals_forward_mode_ad(small, memory_format):
    """path_tangent from the recorded layer inputs == a full forward-mode JVP of the auxiliary logits."""
    s = small
    x = s.x.contiguous(memory_format=memory_format)
    params = {k: p.detach() for k, p in s.model.named_parameters()}
    gen = torch.Generator().manual_seed(5)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=F64) for k, p in params.items()}
    path = maxl.auxiliary_path(s.model)
    # The path is the auxiliary output's whole dependence: every parameter but the primary head's.
    path_params = {f"{name}.{key}" for name, layer in path for key, _ in layer.named_parameters()}
    assert path_params == {k for k in params if not k.startswith("classifier1.")}
    buffers = {k: b.clone() for k, b in s.model.named_buffers()}
    with maxl.recorded_inputs([layer for _, layer in path]) as inputs:
        _, aux_logits = functional_call(s.model, (params, buffers), (x,))
    assert len(inputs) == len(path)
    with torch.no_grad():
        tangent = maxl.path_tangent(path, inputs, params, direction, buffers)
        with maxl.fwAD.dual_level():
            dual = {k: maxl.fwAD.make_dual(p, direction[k]) for k, p in params.items()}
            expected = maxl.fwAD.unpack_dual(functional_call(s.model, (dual, buffers), (x,))[1]).tangent
    assert tangent.shape == expected.shape == aux_logits.shape
    assert expected.norm() > 0
    assert rel_err(tangent, expected) < 1e-12


def test_recorded_inputs_removes_its_hooks_also_on_error(small):
    layers = [layer for _, layer in maxl.auxiliary_path(small.model)]
    with pytest.raises(RuntimeError, match="inside"):
        with maxl.recorded_inputs(layers) as inputs:
            with torch.no_grad():
                small.model(small.x)
            raise RuntimeError("inside")
    assert inputs[layers[0]] is not None and torch.equal(inputs[layers[0]], small.x)
    assert all(not m._forward_pre_hooks for m in small.model.modules())


@pytest.mark.parametrize("setup_name, aux_weight", [("default_psi", 1.0), ("small", 2.5)])
def test_second_order_equals_double_backward(setup_name, aux_weight, request):
    """Forward-mode JVP == the reference's create_graph double backward, to float64 rounding, also with the
    auxiliary loss weighted (--aux-weight)."""
    s = request.getfixturevalue(setup_name)
    exact = s.runs("double-backward", aux_weight=aux_weight).flat
    jvp = s.runs("second-order", aux_weight=aux_weight).flat
    err = rel_err(jvp, exact)
    max_err = ((jvp - exact).abs().max() / exact.abs().max()).item()
    print(f"{setup_name}, aux_weight {aux_weight}: second-order vs double-backward relative error {err:.2e}")
    assert exact.dtype == jvp.dtype == F64
    assert torch.isfinite(exact).all() and exact.norm() > 0
    assert err < 1e-10
    assert max_err < 1e-10


@pytest.mark.parametrize("aux_weight", [2.5])  # at the paper's 1: test_second_order_equals_double_backward
def test_second_order_matches_finite_difference_of_unrolled_objective(small, entropy_gradient, aux_weight):
    s = small
    run = s.runs("second-order", aux_weight=aux_weight)
    params = {k: p.detach() for k, p in s.generator.named_parameters()}
    assert run.shapes == [p.shape for p in params.values()]
    grads = run.flat.split([p.numel() for p in params.values()])
    gen = torch.Generator().manual_seed(11)
    errors, values = [], []
    for _ in range(2):
        v = {k: torch.randn(p.shape, generator=gen, dtype=F64) for k, p in params.items()}
        norm = torch.sqrt(sum((t**2).sum() for t in v.values()))
        v = {k: t / norm for k, t in v.items()}
        analytic = sum((g * v[k].flatten()).sum() for g, k in zip(grads, params)).item()
        j_plus = unrolled_objective(s, {k: p + FD_STEP_J * v[k] for k, p in params.items()}, aux_weight)
        j_minus = unrolled_objective(s, {k: p - FD_STEP_J * v[k] for k, p in params.items()}, aux_weight)
        numeric = (j_plus - j_minus) / (2 * FD_STEP_J)
        errors.append(abs(numeric - analytic) / abs(analytic))
        values.append((analytic, numeric))
    print("directional derivatives (meta_gradients, finite difference of J):", values)
    print("relative errors:", [f"{e:.1e}" for e in errors])
    assert max(errors) < 1e-4
    # The second-order term is what the test measures: the entropy term alone is far off.
    so = s.runs("second-order", aux_weight=aux_weight).flat
    assert rel_err(entropy_gradient, so) > 0.5
    if aux_weight != 1:  # and the weight enters it: the gradient at weight 1 is another
        assert rel_err(so, s.runs("second-order").flat) > 0.1


@pytest.mark.parametrize("aux_weight", [2.5])
def test_finite_difference_converges_to_the_exact_gradient(small, aux_weight):
    s = small
    exact = s.runs("double-backward", aux_weight=aux_weight).flat
    fine = cosine(s.runs("finite-difference", fd_step=1e-5, aux_weight=aux_weight).flat, exact)
    default = cosine(s.runs("finite-difference", fd_step=0.01, aux_weight=aux_weight).flat, exact)
    print(f"cosine(finite-difference, exact): fd_step=1e-5 {fine:.6f}, fd_step=0.01 (default) {default:.6f}")
    assert fine > 0.999
    # At the reference's fd_step=0.01 the central difference crosses ReLU/max-pool kinks of a random network.
    assert default > 0.5


@pytest.mark.parametrize("method", ["second-order", "finite-difference"])
def test_entropy_term_enters_every_method(small, entropy_gradient, method):
    """result(lambda) = result(0) + lambda * grad(negative entropy): the reference's first-order script dropped it."""
    with_entropy = small.runs(method).flat
    without = small.runs(method, entropy_weight=0.0).flat
    difference = with_entropy - without
    err = rel_err(difference, entropy_gradient)
    share = (difference.norm() / with_entropy.norm()).item()
    print(f"{method}: |result(0.2) - result(0)| / |result(0.2)| = {share:.3f}; vs 0.2 * grad(neg. entropy) {err:.1e}")
    assert difference.norm() > 0.01 * with_entropy.norm()
    # Exact up to rounding: ~1e-14 in float64; ~5e-7 while mask_softmax rounds the labels' gradient to float32.
    assert err < 1e-5


@pytest.mark.parametrize("method", ["second-order", "finite-difference"])
def test_tiny_inner_step_leaves_the_entropy_gradient_alone(small, entropy_gradient, method):
    err = rel_err(small.runs(method, inner_lr=1e-12).flat, entropy_gradient)
    print(f"{method}, inner_lr=1e-12: relative error against the entropy term's gradient {err:.1e}")
    # The deviation is linear in inner_lr; on a random VGG it is ~5e-8 of the entropy gradient at 1e-12.
    assert err < 1e-6


@pytest.mark.parametrize("network", ["model", "generator"])
@pytest.mark.parametrize("method", METHODS)
def test_meta_gradients_have_no_side_effects(small, method, network):
    """Parameters, buffers (running stats, num_batches_tracked, the mask), .grad (set or None), train/eval
    flags and forward hooks of the network are as before the call (the docstring's promise, for both networks)."""
    assert [key for key in small.runs(method).changes if key.startswith(network + ".")] == []


@pytest.fixture(scope="module")
def module_reference(small) -> dict:
    """The meta step's primary loss/accuracy recomputed with the modules: forward at theta_1, then one real
    torch.optim.SGD step (lr = inner_lr) of a copy on L_pri + L_aux with the generator's labels, forward again."""
    s = small
    model = copy.deepcopy(s.model).train()
    target = F.one_hot(s.y, len(s.psi)).to(F64)
    with torch.no_grad():
        labels = copy.deepcopy(s.generator).train()(s.x, s.y)
        before = model(s.x)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    optimizer.zero_grad(set_to_none=True)
    primary_logits, aux_logits = model(s.x)
    (maxl.focal_loss(primary_logits, target) + maxl.focal_loss(aux_logits, labels.detach())).backward()
    optimizer.step()
    with torch.no_grad():
        after = model(s.x)[0]
    return {
        "meta_primary_loss_before": maxl.focal_loss(before, target).item(),
        "meta_primary_acc_before": (before.argmax(1) == s.y).double().mean().item(),
        "meta_primary_loss_after": maxl.focal_loss(after, target).item(),
        "meta_primary_acc_after": (after.argmax(1) == s.y).double().mean().item(),
    }


@pytest.mark.parametrize("method", METHODS)
def test_stats_match_the_module(small, module_reference, method):
    stats = small.runs(method).stats
    assert set(stats) == set(module_reference)
    for key, expected in module_reference.items():
        assert stats[key].item() == pytest.approx(expected, rel=1e-6), key
    # The virtual step moved theta_1 (an inner step of 0.1 on a random VGG changes the loss a lot).
    assert stats["meta_primary_loss_after"].item() != pytest.approx(stats["meta_primary_loss_before"].item())


# ---------------------------------------------------------------------------------------------
# Mask softmax and the label generator


def explicit_mask(psi: list[int]) -> torch.Tensor:
    """1 on primary class i's block of auxiliary classes, 1e-8 elsewhere (the reference's mask), float64."""
    mask = torch.full((len(psi), sum(psi)), 1e-8, dtype=F64)
    start = 0
    for i, size in enumerate(psi):
        mask[i, start : start + size] = 1.0
        start += size
    return mask


def reference_mask_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference's exp(x) * mask / sum(exp(x) * mask), in float64 (moderate logits only)."""
    e = torch.exp(logits.double()) * mask
    return e / e.sum(1, keepdim=True)


def test_block_log_mask_shape_and_values():
    log_mask = maxl.block_log_mask([2, 3, 1])
    assert log_mask.shape == (3, 6)
    in_block = torch.tensor(
        [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]],
        dtype=torch.bool,
    )
    assert (log_mask[in_block] == 0).all()
    torch.testing.assert_close(
        log_mask[~in_block].double(), torch.full((12,), math.log(1e-8), dtype=F64), rtol=1e-6, atol=0
    )
    big = maxl.block_log_mask([5] * 20)
    assert big.shape == (20, 100)
    for i in range(20):
        assert (big[i, 5 * i : 5 * i + 5] == 0).all()
        assert (big[i] == 0).sum() == 5
    torch.testing.assert_close(big.double().exp(), explicit_mask([5] * 20), rtol=1e-6, atol=0)


@pytest.mark.parametrize("psi", [[2, 3, 1], [5] * 20], ids=["psi231", "psi5x20"])
def test_mask_softmax_matches_the_reference_formula(psi):
    g = torch.Generator().manual_seed(5)
    n, k = 12, sum(psi)
    logits = 3 * torch.randn(n, k, generator=g, dtype=F64)
    y = torch.arange(n) % len(psi)
    probs = maxl.mask_softmax(logits, maxl.block_log_mask(psi)[y])
    expected = reference_mask_softmax(logits, explicit_mask(psi)[y])
    torch.testing.assert_close(probs.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(probs.double().sum(1), torch.ones(n, dtype=F64), rtol=0, atol=1e-6)
    # Mass outside the sample's block: 1e-8 * S_out / (S_in + 1e-8 * S_out), S = sum of exp(logits) over the set.
    inside = explicit_mask(psi)[y] == 1
    s_in = (logits.exp() * inside).sum(1)
    s_out = (logits.exp() * ~inside).sum(1)
    outside_mass = (probs.double() * ~inside).sum(1)
    torch.testing.assert_close(outside_mass, 1e-8 * s_out / (s_in + 1e-8 * s_out), rtol=1e-5, atol=0)


def test_mask_softmax_unequal_blocks_with_equal_logits():
    """psi = [2, 3, 1], zero logits: block y gets everything but the floor, shared equally by its psi_y classes."""
    psi = [2, 3, 1]
    y = torch.tensor([0, 1, 2])
    probs = maxl.mask_softmax(torch.zeros(3, 6, dtype=F64), maxl.block_log_mask(psi)[y]).double()
    for row, cls in enumerate(y.tolist()):
        size, outside = psi[cls], 6 - psi[cls]
        start = sum(psi[:cls])
        inside_value = 1 / (size + 1e-8 * outside)
        expected = torch.full((6,), 1e-8 * inside_value, dtype=F64)
        expected[start : start + size] = inside_value
        torch.testing.assert_close(probs[row], expected, rtol=1e-6, atol=0)
        assert probs[row, start : start + size].sum().item() == pytest.approx(1 - 1e-8 * outside, abs=1e-7)


def test_mask_softmax_does_not_overflow_on_huge_logits():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(8, 6, generator=g, dtype=F64) * 1e4
    y = torch.arange(8) % 3
    probs = maxl.mask_softmax(logits, maxl.block_log_mask(PSI)[y]).double()
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(8, dtype=F64), rtol=0, atol=1e-6)
    # The reference formula with the maximum shifted out (same values, computable at this scale).
    shifted = logits + explicit_mask(PSI)[y].log()
    shifted = shifted - shifted.max(1, keepdim=True).values
    expected = shifted.exp() / shifted.exp().sum(1, keepdim=True)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    # The plain reference formula overflows here: exp(1e4) = inf, inf / inf = nan.
    assert torch.isnan(reference_mask_softmax(logits, explicit_mask(PSI)[y])).any()


def test_float64_inputs_are_computed_in_float64():
    """The pure functions are the test oracles' counterpart: given float64 they must not round to float32.

    (focal_terms and mask_softmax call .float(), meant to lift bf16 under autocast, which also lowers float64.)
    """
    g = torch.Generator().manual_seed(7)
    logits = 1 + 1e-9 * torch.randn(4, 6, generator=g, dtype=F64)  # differences below float32 resolution
    terms = maxl.focal_terms(logits)
    assert terms.dtype == F64
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(terms, -((1 - p) ** 2) * p.log(), rtol=1e-12, atol=0)
    log_mask = maxl.block_log_mask(PSI).double()[torch.tensor([0, 1, 2, 1])]
    probs = maxl.mask_softmax(logits, log_mask)
    assert probs.dtype == F64
    torch.testing.assert_close(probs, torch.softmax(logits + log_mask, 1), rtol=1e-12, atol=0)


def test_label_generator_output(small):
    """The generator's labels: mask softmax of its own logits, rows summing to 1, confined to the block."""
    generator = copy.deepcopy(small.generator).train()
    with torch.no_grad():
        labels = generator(small.x, small.y)
        logits = generator.classifier(generator.features(small.x))
    assert labels.shape == (4, sum(PSI))
    assert torch.equal(generator.log_mask, maxl.block_log_mask(PSI).to(F64))
    torch.testing.assert_close(labels.sum(1), torch.ones(4, dtype=F64), rtol=0, atol=1e-6)
    mask = explicit_mask(PSI)[small.y]
    torch.testing.assert_close(labels, reference_mask_softmax(logits, mask), rtol=1e-5, atol=0)
    inside = mask == 1
    assert ((labels * inside).sum(1) > 1 - 1e-5).all()


# ---------------------------------------------------------------------------------------------
# Entropy regulariser and the gradient-cosine diagnostic


def test_negative_entropy_of_the_batch_mean():
    g = torch.Generator().manual_seed(8)
    probs = torch.softmax(torch.randn(5, 7, generator=g, dtype=F64), dim=1)
    q = probs.mean(0)
    expected = sum(q[k] * math.log(q[k]) for k in range(7))
    assert maxl.negative_entropy(probs).item() == pytest.approx(expected.item(), rel=1e-12)
    # A batch whose mean is uniform (each row one-hot, every class once) reaches the minimum, -log K.
    assert maxl.negative_entropy(torch.eye(7, dtype=F64)).item() == pytest.approx(-math.log(7), rel=1e-12)
    assert maxl.negative_entropy(torch.full((3, 7), 1 / 7, dtype=F64)).item() == pytest.approx(-math.log(7))
    # Zeros in q are fine (0 log 0 = 0): a batch on one class has entropy 0.
    assert maxl.negative_entropy(F.one_hot(torch.tensor([2, 2, 2]), 7).double()).item() == 0.0


def test_gradient_cosine_is_the_references_per_output_channel_mean():
    """The reference's current formula: each gradient as (output channels, -1), the cosine per output channel
    (row), averaged; then the mean over tensors. Checked by hand on small tensors, 1-D ones included."""
    g = torch.Generator().manual_seed(9)
    shapes = [(8, 3, 3, 3), (8,), (4, 8), (16, 8, 3, 3)]
    a = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    b = [torch.randn(s, generator=g, dtype=F64) + 0.5 * t for s, t in zip(shapes, a)]

    def by_hand(x, y):
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        rows = [(x[i] @ y[i]) / (x[i].norm() * y[i].norm()) for i in range(x.shape[0])]
        return sum(rows) / len(rows)

    expected = sum(by_hand(x, y) for x, y in zip(a, b)) / len(a)
    torch.testing.assert_close(maxl.gradient_cosine(a, b), expected, rtol=1e-12, atol=0)
    # A 1-D tensor (a bias) has one value per output channel: its cosine per channel is the sign of the product.
    bias_a, bias_b = torch.tensor([1.0, -2.0, 3.0], dtype=F64), torch.tensor([2.0, 5.0, 0.5], dtype=F64)
    assert maxl.gradient_cosine([bias_a], [bias_b]).item() == pytest.approx((1 - 1 + 1) / 3)
    # A 2x2 weight by hand: rows (1, 0)·(1, 1)/sqrt(2) and (0, 1)·(0, -1) = -1.
    w1, w2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64), torch.tensor([[1.0, 1.0], [0.0, -1.0]], dtype=F64)
    assert maxl.gradient_cosine([w1], [w2]).item() == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    # It is not the formula over dim 0 of the raw tensors (the reference's code before "update for pytorch 1.8").
    old = torch.stack([F.cosine_similarity(x, y, dim=0).mean() for x, y in zip(a, b)]).mean()
    assert not torch.isclose(maxl.gradient_cosine(a, b), old)
    assert maxl.gradient_cosine(a, a).item() == pytest.approx(1.0)
    assert maxl.gradient_cosine(a, [-t for t in a]).item() == pytest.approx(-1.0)


def test_train_step_cosine_and_update_match_a_direct_computation():
    """Phase 1's cosine diagnostic is the reference's (two separate gradients); it does not change the step."""
    cfg = maxl.check_config(maxl.Config(device="cpu", primary_level=3, psi="2,3,1", cossim_every=1))
    torch.manual_seed(0)
    state = maxl.build(cfg, torch.device("cpu"))
    images = torch.randn(6, 3, 32, 32)
    fine = torch.tensor([0, 1, 2, 3, 4, 5])
    labels = torch.from_numpy(hierarchy_labels(fine.numpy(), np.asarray(FINE_TO_COARSE)[fine.numpy()]))
    model = state["model"]
    start = copy.deepcopy(model.state_dict())

    primary = labels[:, 0]
    probe = copy.deepcopy(model)
    with torch.no_grad():
        targets = state["label_generator"](images, primary)
    primary_logits, aux_logits = probe(images)
    shared = probe.shared_parameters()
    g_pri = torch.autograd.grad(
        maxl.focal_loss(primary_logits, F.one_hot(primary, 3).float()), shared, retain_graph=True
    )
    g_aux = torch.autograd.grad(maxl.focal_loss(aux_logits, targets), shared)
    expected = maxl.gradient_cosine(g_pri, g_aux)

    out = maxl.train_step(state, images, labels, cfg, diagnose=True)
    assert torch.allclose(out["train_cosine"], expected, atol=1e-5), (out["train_cosine"], expected)
    with_diagnostic = copy.deepcopy(model.state_dict())

    model.load_state_dict(start)
    maxl.train_step(state, images, labels, cfg, diagnose=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, with_diagnostic[name]), name


# ---------------------------------------------------------------------------------------------
# psi: from the hierarchy (--aux-level) or given (--psi)


@pytest.mark.parametrize("pair", [(3, 10), (3, 20), (3, 100), (10, 20), (10, 100), (20, 100)])
def test_aux_level_sets_psi_from_the_hierarchy(pair):
    primary_level, aux_level = pair
    cfg = maxl.check_config(maxl.Config(primary_level=primary_level, aux_level=aux_level))
    assert cfg.psi == hierarchy_psi(primary_level, aux_level) and cfg.aux_level == aux_level
    assert maxl.derived_settings(cfg) == {"psi_list": cfg.psi, "aux_classes": aux_level}
    assert maxl.run_name_stem(cfg) == f"maxl-second-order-pri{primary_level}-aux{aux_level}-seed0"
    model, generator = maxl.VGG16(cfg.psi), maxl.LabelGenerator(cfg.psi)
    assert model.classifier2[-1].out_features == generator.classifier[-1].out_features == aux_level


def test_the_default_is_the_papers_psi_and_psi_5_is_the_same_run():
    default = maxl.check_config(maxl.Config())
    assert default.psi == [5] * 20 and default.aux_level == 100
    given = maxl.check_config(maxl.Config(psi="5"))
    assert given == default  # the same settings: the same run name, resumable either way
    assert maxl.check_config(default) == default  # a checked config passes again unchanged
    assert maxl.check_config(maxl.Config(psi=[5] * 20)) == default  # as the authors wrote it in the file


def test_a_psi_outside_the_hierarchy_has_no_aux_level():
    cfg = maxl.check_config(maxl.Config(primary_level=3, psi="2,3,4"))
    assert cfg.psi == [2, 3, 4] and cfg.aux_level is None
    assert maxl.check_config(maxl.Config(primary_level=3, psi=[2, 3, 4])) == cfg  # as written in the file


def test_psi_follows_the_levels_in_the_file_as_on_the_command_line():
    """A Config edit is a flag: psi None (the file's default) follows primary_level and aux_level however they are
    set; a psi set in the file is kept unless --psi overrides it."""
    assert maxl.Config().psi is None
    for fields, argv, psi in [
        ({}, [], [5] * 20),
        ({"primary_level": 10}, ["--primary-level", "10"], hierarchy_psi(10, 100)),
        ({"primary_level": 3, "aux_level": 10}, ["--primary-level", "3", "--aux-level", "10"], [5, 1, 4]),
        ({"primary_level": 3, "psi": [2, 3, 4]}, ["--primary-level", "3", "--psi", "2,3,4"], [2, 3, 4]),
    ]:
        from_file = maxl.check_config(maxl.Config(**fields))
        from_flags = maxl.check_config(experiment.parse_flags(maxl.Config, argv))
        assert from_file.psi == from_flags.psi == psi, argv
        assert experiment.settings(from_file) == experiment.settings(from_flags)
    # A psi edited in the file stays when a level flag is given, and a flag overrides it.
    psi = ("psi", "list[int] | str | None", experiment.option([2, 3, 4], "psi", type=str))
    edited = dataclasses.make_dataclass("Edited", [psi], bases=(maxl.Config,))  # psi = [2, 3, 4] in the file
    assert maxl.check_config(experiment.parse_flags(edited, ["--primary-level", "3"])).psi == [2, 3, 4]
    assert maxl.check_config(experiment.parse_flags(edited, ["--primary-level", "3", "--psi", "5"])).psi == [5, 5, 5]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--psi", "5", "--aux-level", "100"], "--psi 5 and --aux-level 100 both set psi"),
        (["--aux-level", "20"], "--aux-level 20 must be finer than primary_level 20 (choose from 100)"),
        (["--primary-level", "10", "--aux-level", "10"], "must be finer than --primary-level 10 (choose from 20, 100)"),
        (["--psi", "2,3"], "--psi has 2 entries but the primary task has 20 classes"),
        (["--primary-level", "3", "--psi", "2,0,1"], "--psi 2,0,1: every primary class needs at least 1 auxiliary"),
    ],
)
def test_psi_and_aux_level_refusals_name_the_flags(argv, message):
    with pytest.raises(experiment.UsageError, match=re.escape(message)):
        maxl.check_config(experiment.parse_flags(maxl.Config, argv))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"psi": [4, 6] * 10, "aux_level": 100}, "6, 4, 6] is not the hierarchy's at aux_level 100"),
        ({"primary_level": 10, "psi": [5] * 20}, "psi has 20 entries but the primary task has 10 classes"),
        ({"primary_level": 10, "aux_level": 10}, "aux_level 10 must be finer than primary_level 10"),
    ],
)  # fmt: skip
def test_psi_and_aux_level_refusals_name_the_fields_edited_in_config(changes, message):
    """A setting edited in the file is named as the Config field it is, not as a flag nobody gave."""
    with pytest.raises(experiment.UsageError, match=re.escape(message)):
        maxl.check_config(maxl.Config(**changes))
