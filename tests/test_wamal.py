"""WAMAL (model_vgg_wamal.py): MAXL with meta-learned per-sample auxiliary weights.

- With the weight head fixed at w = 0.5 (m = 1), an epoch is MAXL's, bit for bit, for every meta-gradient method.
- The exact meta-gradient w.r.t. the whole generator (trunk, label head, weight head) equals the double backward
  through the inner step and a finite difference of the unrolled objective; the finite-difference method
  converges to it. The networks are the real VGG-16s in float64 on three 32x32 images (BatchNorm in train mode).
- `--weighting sample` gives every image its own weight gradient; `--weighting batch` is the authors' arithmetic,
  mean(m) * mean(focal), under which every image's multiplier gets the same gradient.
- Run names, published figures, refused input; one run end to end and resume.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FAST, REPO, default_name, run_main
from test_run_names import DATA_BASE, DATA_EDITS, EDITS, RUN_ONLY
from torch.func import functional_call

import experiment
import model_vgg_maxl as maxl
import model_vgg_wamal as wamal
from create_dataset import FINE_TO_COARSE, hierarchy_labels

# One worker runs the whole module: its cached float64 meta-gradients are computed once, not on each worker.
pytestmark = pytest.mark.xdist_group("wamal")

F64 = torch.float64
PSI = [2, 3, 1]  # primary level 3 with unequal blocks
INNER_LR = 0.1  # large enough that the second-order term dominates the entropy term
ENTROPY_WEIGHT = 0.2
WEIGHT_RANGE = 15.0  # the paper's R
METHODS = ("second-order", "finite-difference", "double-backward")
# Step of the finite difference of the unrolled objective J along a unit direction of theta_2, as in
# test_maxl_math.py: small enough not to cross ReLU/max-pool kinks, large against J's float64 rounding.
FD_STEP_J = 1e-7
PAPER_NAME = "wamal-second-order-pri20-aux100-seed0"


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------
# With m = 1, WAMAL is MAXL


class HalfWeight(nn.Module):
    """In place of the weight head's sigmoid: exactly 0.5 (m = 1) whatever the head's parameters. Still on the
    graph (0 * x), so the head's parameters receive (zero) gradients as they do in a real run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0 * x


EQUAL_START_SETTINGS = dict(device="cpu", primary_level=3, psi="2,3,1", batch_size=2)


@pytest.fixture(scope="module")
def built() -> dict:
    """Each script's networks and optimisers, built from seed 0 (copied afresh for each method)."""
    states = {}
    for module in (maxl, wamal):
        torch.manual_seed(0)
        cfg = module.check_config(module.Config(**EQUAL_START_SETTINGS))
        states[module.__name__.removeprefix("model_vgg_")] = module.build(cfg, torch.device("cpu"))
    return states


@pytest.mark.parametrize("method", METHODS)
def test_an_epoch_with_unit_multipliers_is_maxls(built, method):
    """Same seed, same data (an epoch of one batch of two images; the cosine diagnostic on): MAXL's train_epoch
    and WAMAL's with the weight head fixed at 0.5 return the same metrics (every MAXL metric, compared with ==)
    and leave the same networks (the multi-task network, and the generator's trunk and label head, compared
    with torch.equal), after starting from the same ones."""
    device = torch.device("cpu")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fine = np.array([4, 0])  # superclasses 0 and 1: classes 0 and 1 of the 3-class level
    labels = torch.from_numpy(hierarchy_labels(fine, np.asarray(FINE_TO_COARSE)[fine]))
    loader = [(images, labels)]  # an epoch of one batch
    results = {}
    for module in (maxl, wamal):
        cfg = module.check_config(module.Config(**EQUAL_START_SETTINGS, meta_grad=method))
        state = copy.deepcopy(built[module.__name__.removeprefix("model_vgg_")])
        if module is wamal:
            state["label_generator"].weight_head[-1] = HalfWeight()
        start = {
            net: {k: v.clone() for k, v in state[net].state_dict().items()} for net in ("model", "label_generator")
        }
        graphs = experiment.StepGraphs([], device, enabled=False)
        metrics = module.train_epoch(state, graphs, loader, cfg, device, epoch=1)
        results[module.__name__.removeprefix("model_vgg_")] = SimpleNamespace(start=start, metrics=metrics, state=state)
    ours, theirs = results["wamal"], results["maxl"]
    for net in ("model", "label_generator"):
        assert set(theirs.start[net]) <= set(ours.start[net])
        for key, value in theirs.start[net].items():
            assert torch.equal(ours.start[net][key], value), ("the same seed must give the same start", net, key)
    assert set(theirs.metrics) <= set(ours.metrics)
    for key, value in theirs.metrics.items():
        assert ours.metrics[key] == value, (key, ours.metrics[key], value)
    for net in ("model", "label_generator"):
        after = ours.state[net].state_dict()
        for key, value in theirs.state[net].state_dict().items():
            assert torch.equal(after[key], value), (net, key)
            if key.endswith("weight") and "classifier" in key:
                assert not torch.equal(value, theirs.start[net][key]), ("the epoch trained", net, key)
    m = ours.metrics
    assert m["aux_multiplier_mean"] == m["aux_multiplier_min"] == m["aux_multiplier_max"] == 1.0
    assert m["aux_multiplier_near_bounds"] == 0.0
    assert m["train_weighted_aux_loss"] == m["train_aux_loss"]


# ---------------------------------------------------------------------------------------------
# The exact meta-gradient, both heads


class MetaRuns:
    """meta_gradients on one float64 setup, each configuration computed once. Records grad_theta_2 J, dJ/dw at
    the weight head's output, and whether any parameter, .grad or buffer of either network changed."""

    def __init__(self, setup: SimpleNamespace):
        self.setup = setup
        self.cache: dict[tuple, SimpleNamespace] = {}

    def __call__(
        self, method: str, weighting: str = "sample", fd_step: float = 0.01, aux_weight: float = 1.0
    ) -> SimpleNamespace:
        key = (method, weighting, fd_step, aux_weight)
        if key not in self.cache:
            s = self.setup
            nets = {"model": s.model, "generator": s.generator}
            before = {
                (net, kind, name): t.detach().clone()
                for net, module in nets.items()
                for kind, named in (("param", module.named_parameters()), ("buffer", module.named_buffers()))
                for name, t in named
            }
            grads_before = {(net, n): p.grad.clone() for net, m in nets.items() for n, p in m.named_parameters()}
            weight_output_grads = []

            def keep_output_grad(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                if out.requires_grad:
                    out.register_hook(weight_output_grads.append)

            hook = s.generator.weight_head.register_forward_hook(keep_output_grad)
            try:
                grads, stats = wamal.wamal_meta_gradients(
                    model=s.model,
                    label_generator=s.generator,
                    images=s.x,
                    primary=s.y,
                    inner_lr=INNER_LR,
                    method=method,
                    entropy_weight=ENTROPY_WEIGHT,
                    focal_gamma=2.0,
                    fd_step=fd_step,
                    weight_range=WEIGHT_RANGE,
                    weighting=weighting,
                    aux_weight=aux_weight,
                )
            finally:
                hook.remove()
            live = {
                (net, kind, name): t.detach()
                for net, module in nets.items()
                for kind, named in (("param", module.named_parameters()), ("buffer", module.named_buffers()))
                for name, t in named
            }
            changed = [k for k, v in before.items() if not torch.equal(v, live[k])]
            changed += [
                k for k, g in grads_before.items() if not torch.equal(g, dict(nets[k[0]].named_parameters())[k[1]].grad)
            ]
            (weight_output_grad,) = weight_output_grads
            head = [name.startswith("weight_head.") for name, _ in s.generator.named_parameters()]
            self.cache[key] = SimpleNamespace(
                flat=flat(grads),
                weight_head=flat([g for g, is_head in zip(grads, head) if is_head]),
                weight_output_grad=weight_output_grad.squeeze(1),
                shapes=[g.shape for g in grads],
                stats=stats,
                changed=changed,
            )
        return self.cache[key]


@pytest.fixture(scope="module")
def setup() -> SimpleNamespace:
    """psi [2, 3, 1], three images (one per primary class), float64; non-trivial running statistics and a .grad
    on every parameter, all of which meta_gradients must leave alone."""
    torch.manual_seed(0)
    model = wamal.VGG16(PSI).to(F64).train()
    generator = wamal.LabelWeightGenerator(PSI).to(F64).train()
    for net in (model, generator):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
    s = SimpleNamespace(
        model=model, generator=generator, x=torch.randn(3, 3, 32, 32, dtype=F64), y=torch.tensor([0, 1, 2])
    )
    with torch.no_grad():
        _, weights = generator(s.x, s.y)
    s.multipliers = wamal.aux_multipliers(weights, WEIGHT_RANGE)
    s.runs = MetaRuns(s)
    return s


def test_the_images_start_with_different_multipliers(setup):
    """What the weighting tests below rely on, at PyTorch's default init of the weight head."""
    m = setup.multipliers
    assert m.dtype == F64 and m.shape == (3,)
    assert (m.max() / m.min()).item() > 1.05 and 2**-WEIGHT_RANGE < m.min() and m.max() < 2**WEIGHT_RANGE


@pytest.mark.parametrize("weighting, aux_weight", [("sample", 3.0), ("batch", 1.0)])
def test_second_order_equals_double_backward(setup, weighting, aux_weight):
    """Forward-mode JVP == the create_graph double backward, to float64 rounding, for the whole generator and
    for the weight head alone (a small part of the whole gradient's norm, so compared on its own); also with the
    auxiliary loss weighted (--aux-weight)."""
    exact = setup.runs("double-backward", weighting, aux_weight=aux_weight)
    jvp = setup.runs("second-order", weighting, aux_weight=aux_weight)
    assert exact.flat.dtype == jvp.flat.dtype == F64
    assert jvp.shapes == [p.shape for p in setup.generator.parameters()]
    assert exact.weight_head.norm() > 0 and torch.isfinite(exact.flat).all()
    errors = rel_err(jvp.flat, exact.flat), rel_err(jvp.weight_head, exact.weight_head)
    print(f"{weighting}: second-order vs double-backward, relative error {errors[0]:.1e}, weight head {errors[1]:.1e}")
    assert max(errors) < 1e-10
    assert rel_err(jvp.weight_output_grad, exact.weight_output_grad) < 1e-10
    for key, value in exact.stats.items():
        assert jvp.stats[key].item() == pytest.approx(value.item(), rel=1e-12), key
    assert exact.changed == jvp.changed == []


def unrolled_objective(s: SimpleNamespace, gen_params: dict, aux_weight: float = 1.0) -> float:
    """J(theta_2) = L_pri(theta_1^+) + entropy_weight * sum q log q, written out here:
    theta_1^+ = theta_1 - inner_lr * grad(L_pri + a L_aux), L_aux = mean_i m_i l_i, m = 2^(R (2w - 1)),
    a = --aux-weight."""
    target = F.one_hot(s.y, len(PSI)).to(F64)

    def focal(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits, 1)
        return -(t * (1 - p) ** 2 * p.log()).sum(1)

    with torch.no_grad():
        buffers = {k: b.clone() for k, b in s.generator.named_buffers()}
        labels, w = functional_call(s.generator, (gen_params, buffers), (s.x, s.y))
        m = 2 ** (WEIGHT_RANGE * (2 * w - 1))
    theta1 = {k: p.detach().clone().requires_grad_() for k, p in s.model.named_parameters()}
    buffers = {k: b.clone() for k, b in s.model.named_buffers()}
    primary_logits, aux_logits = functional_call(s.model, (theta1, buffers), (s.x,))
    aux = focal(aux_logits, labels)
    train_loss = focal(primary_logits, target).mean() + aux_weight * (m * aux).mean()
    grads = torch.autograd.grad(train_loss, list(theta1.values()))
    with torch.no_grad():
        theta1_plus = {k: p - INNER_LR * g for (k, p), g in zip(theta1.items(), grads)}
        primary_plus, _ = functional_call(s.model, (theta1_plus, buffers), (s.x,))
        q = labels.mean(0)
        return (focal(primary_plus, target).mean() + ENTROPY_WEIGHT * (q * q.log()).sum()).item()


@pytest.mark.parametrize("aux_weight", [3.0])
def test_second_order_matches_a_finite_difference_of_the_unrolled_objective(setup, aux_weight):
    """Directional derivatives of J along random unit directions: of all of theta_2, and of the weight head alone
    (whose share of a direction of all 15M parameters is small). The paper's weighting; the authors' is checked
    against the double backward above, whose loss test_weighted_aux_loss checks against their formula."""
    s = setup
    params = {k: p.detach() for k, p in s.generator.named_parameters()}
    run = s.runs("second-order", "sample", aux_weight=aux_weight)
    grads = dict(zip(params, run.flat.split([p.numel() for p in params.values()])))
    gen = torch.Generator().manual_seed(11)
    errors = []
    for only_weight_head in (False, True):
        v = {
            k: torch.randn(p.shape, generator=gen, dtype=F64) * (not only_weight_head or k.startswith("weight_head."))
            for k, p in params.items()
        }
        norm = torch.sqrt(sum((t**2).sum() for t in v.values()))
        v = {k: t / norm for k, t in v.items()}
        analytic = sum((grads[k] * v[k].flatten()).sum() for k in params).item()
        j_plus = unrolled_objective(s, {k: p + FD_STEP_J * v[k] for k, p in params.items()}, aux_weight)
        j_minus = unrolled_objective(s, {k: p - FD_STEP_J * v[k] for k, p in params.items()}, aux_weight)
        numeric = (j_plus - j_minus) / (2 * FD_STEP_J)
        errors.append(abs(numeric - analytic) / abs(analytic))
        print(f"aux weight {aux_weight}, weight head only {only_weight_head}: {analytic:.6e} vs {numeric:.6e}")
    assert max(errors) < 1e-4, errors


@pytest.mark.parametrize("aux_weight", [3.0])
def test_the_finite_difference_method_converges_to_the_exact_gradient(setup, aux_weight):
    """--meta-grad finite-difference at a small --fd-step: the exact gradient's direction, weight head included."""
    exact = setup.runs("double-backward", "sample", aux_weight=aux_weight)
    fine = setup.runs("finite-difference", "sample", fd_step=1e-5, aux_weight=aux_weight)
    cosines = [
        F.cosine_similarity(a, b, dim=0).item()
        for a, b in ((fine.flat, exact.flat), (fine.weight_head, exact.weight_head))
    ]
    print(f"cosine(finite-difference at fd_step 1e-5, exact): generator {cosines[0]:.8f}, weight head {cosines[1]:.8f}")
    assert min(cosines) > 0.999
    assert fine.changed == []


# ---------------------------------------------------------------------------------------------
# The weighting: each image's own (the paper) or one batch scale (the authors' code)


def multiplier_gradient(run: SimpleNamespace, multipliers: torch.Tensor) -> torch.Tensor:
    """dJ/dm_i from dJ/dw_i: dm/dw = 2 R ln(2) m."""
    return run.weight_output_grad / (2 * WEIGHT_RANGE * math.log(2) * multipliers)


def test_sample_weighting_gives_each_image_its_own_weight_gradient(setup):
    """dJ/dm_i = sum_k t_ik dJ/dp_ik differs between images: each image's weight learns from its own labels."""
    run = setup.runs("double-backward", "sample")
    grad_w = run.weight_output_grad
    grad_m = multiplier_gradient(run, setup.multipliers)
    print("sample weighting: dJ/dw", grad_w.tolist(), "dJ/dm", grad_m.tolist())
    assert (grad_w != 0).all()
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert setup.multipliers[i] != setup.multipliers[j]
        assert abs(grad_w[i] - grad_w[j]) > 1e-3 * grad_w.abs().max()
        assert abs(grad_m[i] - grad_m[j]) > 1e-3 * grad_m.abs().max()


def test_batch_weighting_gives_every_image_the_same_multiplier_gradient(setup):
    """Under mean(m) * mean(focal) only the batch mean of m matters: dJ/dm_i is the same for every image."""
    grad_m = multiplier_gradient(setup.runs("double-backward", "batch"), setup.multipliers)
    print("batch weighting: dJ/dm", grad_m.tolist())
    assert grad_m.abs().min() > 0
    torch.testing.assert_close(grad_m, grad_m.mean().expand(3), rtol=1e-10, atol=0)


def test_weighted_aux_loss():
    gen = torch.Generator().manual_seed(4)
    per_sample = torch.rand(6, generator=gen, dtype=F64) * 3
    m = 2 ** (torch.rand(6, generator=gen, dtype=F64) * 8 - 4)
    sample = wamal.weighted_aux_loss(per_sample, m, "sample")
    assert sample.item() == pytest.approx(sum(m[i].item() * per_sample[i].item() for i in range(6)) / 6, rel=1e-14)
    batch = wamal.weighted_aux_loss(per_sample, m, "batch")
    assert torch.equal(batch, m.mean() * per_sample.mean())
    # The authors' code: a (B,) loss times (B, 1) weights broadcasts to B x B; its mean is mean(m) * mean(loss).
    authors = per_sample * m.unsqueeze(1)
    assert authors.shape == (6, 6)
    assert batch.item() == pytest.approx(authors.mean().item(), rel=1e-14)
    assert sample.item() != pytest.approx(batch.item(), rel=1e-3)
    for weighting in wamal.WEIGHTINGS:
        coefficients = wamal.label_coefficients(m, weighting)
        assert coefficients.shape == (6,)
        assert (coefficients * per_sample).mean().item() == pytest.approx(
            wamal.weighted_aux_loss(per_sample, m, weighting).item(), rel=1e-14
        )
        # Unit multipliers give MAXL's loss exactly.
        assert torch.equal(wamal.weighted_aux_loss(per_sample, torch.ones(6, dtype=F64), weighting), per_sample.mean())


def test_multipliers_and_their_bounds():
    w = torch.tensor([0.0, 0.5, 1.0, 0.75, 1 / 30, 29 / 30], dtype=F64)
    m = wamal.aux_multipliers(w, 15.0)
    assert m.dtype == F64
    assert m[1].item() == 1.0
    assert m[0].item() == 2.0**-15 and m[2].item() == 2.0**15
    assert m[3].item() == pytest.approx(2.0**7.5, rel=1e-14)
    # Within a factor 2 of a bound: |log2 m| >= R - 1, i.e. |2w - 1| >= 14/15.
    assert wamal.near_bounds(m, 15.0).tolist() == [True, False, True, False, True, True]
    assert wamal.near_bounds(wamal.aux_multipliers(torch.tensor([0.034, 0.966]), 15.0), 15.0).tolist() == [False, False]
    assert wamal.aux_multipliers(torch.tensor([0.5], dtype=torch.bfloat16), 15.0).dtype == torch.float32


def test_the_generator_gives_labels_and_a_weight_per_image(setup):
    generator = setup.generator
    assert [name for name, _ in generator.named_children()][-1] == "weight_head"
    assert [type(m) for m in generator.weight_head] == [nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert generator.weight_head[0].in_features == 512 and generator.weight_head[2].out_features == 1
    with torch.no_grad():
        labels, weights = generator(setup.x, setup.y)
    assert labels.shape == (3, sum(PSI)) and weights.shape == (3,)
    assert ((0 < weights) & (weights < 1)).all()
    torch.testing.assert_close(labels.sum(1), torch.ones(3, dtype=F64), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Run names, published figures, the layout


def name(**changes) -> str:
    return default_name(wamal, wamal.check_config(wamal.Config(**changes)))


WAMAL_EDITS = {**EDITS, **DATA_EDITS, "weight_range": 10.0, "weighting": "batch"}


def test_the_papers_configuration_keeps_its_readable_name():
    assert name() == PAPER_NAME
    assert name(meta_grad="finite-difference") == "wamal-finite-difference-pri20-aux100-seed0"
    assert name(primary_level=10, aux_level=20, seed=2) == "wamal-second-order-pri10-aux20-seed2"


def test_every_setting_is_in_the_name_or_never_changes_it():
    """As test_run_names.py does for the other scripts, with WAMAL's two settings."""
    for field in experiment.fields(wamal.Config):
        if field.name in RUN_ONLY:
            continue
        assert field.name in WAMAL_EDITS, f"no test value for {field.name}"
        base = {"primary_level": 3} if field.name == "aux_level" else {}
        base |= {"meta_grad": "finite-difference"} if field.name == "fd_step" else {}
        base |= DATA_BASE.get(field.name, {})
        assert name(**base, **{field.name: WAMAL_EDITS[field.name]}) != name(**base), field.name
    run_only = dict(epochs=3, workers=0, data_root="elsewhere", download=False, cuda_graphs=False, device="cpu")
    run_only |= dict(deterministic=True, compile=True, channels_last=False, data_path="loader", results_dir="r")
    assert name(**run_only) == PAPER_NAME


def test_the_new_settings_add_a_stable_hash():
    batch = name(weighting="batch")
    assert re.fullmatch(PAPER_NAME + r"-[0-9a-f]{8}", batch)
    assert name(weighting="batch") == batch and name(weight_range=10.0) not in (batch, PAPER_NAME)
    cfg = wamal.check_config(wamal.Config(weighting="batch", weight_range=10.0))
    assert experiment.edited_settings(cfg, wamal.paper_settings(cfg)) == {
        "weight_range": 10.0,
        "weighting": "batch",
    }
    assert name(weight_range=15) == PAPER_NAME  # the same value written as an integer


def test_config_defaults_are_the_papers_settings():
    cfg = wamal.check_config(wamal.Config())
    paper = wamal.paper_settings(cfg)
    assert paper["weight_range"] == 15.0 and paper["weighting"] == "sample"
    for key, value in paper.items():
        assert getattr(cfg, key) == value, key


def test_a_weight_range_edited_in_the_file_gives_a_new_name(tmp_path):
    source = (REPO / "model_vgg_wamal.py").read_text()
    edited = source.replace(
        "weight_range: float = option(\n        15.0,", "weight_range: float = option(\n        10.0,", 1
    )
    assert edited != source
    path = tmp_path / "model_vgg_wamal_edited.py"
    path.write_text(edited)
    spec = importlib.util.spec_from_file_location("model_vgg_wamal_edited", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up while building Config
    try:
        spec.loader.exec_module(module)
        assert default_name(module, module.check_config(module.Config())) == name(weight_range=10.0)
    finally:
        del sys.modules[spec.name]


def test_published_accuracy_and_derived_settings():
    cfg = wamal.check_config(wamal.Config())
    rl_aux = "rl-aux notebook, a reproduction: one run, mean of its last 15 of {} epochs"
    assert wamal.published_accuracy(cfg) == {
        "WAMAL paper's abstract": 80.2,
        "WAMAL authors' README": 81.5,
        rl_aux.format(200): 81.31,
    }
    assert wamal.published_accuracy(wamal.check_config(wamal.Config(aux_weight=2.0))) == {}
    for dataset, epochs, figure in (("cifar10", 80, 92.50), ("svhn", 125, 96.19)):
        cfg_there = wamal.check_config(wamal.Config(dataset=dataset))
        assert wamal.published_accuracy(cfg_there) == {rl_aux.format(epochs): figure}
    assert wamal.published_accuracy(wamal.check_config(wamal.Config(primary_level=10, aux_level=100))) == {}
    assert wamal.derived_settings(cfg)["aux_multiplier_bounds"] == [2.0**-15, 2.0**15]


# ---------------------------------------------------------------------------------------------
# End to end, resume, refused input


def flags(data_root, results, *extra: str) -> list[str]:
    return ["--data-root", str(data_root), "--results-dir", str(results), *FAST, *extra]


def test_a_run_end_to_end_and_resumed(data_root, tmp_path):
    """One epoch as a user runs it, then --resume for a second one: the same metrics as two epochs straight.
    With the authors' weighting, which the unit tests above reach only through meta_gradients."""
    common = flags(data_root, tmp_path, "--limit-batches", "1", "--batch-size", "2", "--weighting", "batch")
    first = run_main(wamal, *common, "--epochs", "1", "--run-name", "split")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    (line,) = [line for line in first.stdout.splitlines() if line.startswith("epoch")]
    assert re.search(r"\| m [\d.e+-]+ \[[\d.e+-]+, [\d.e+-]+\] near bounds [\d.]+% \| aux used \d+ \|", line), line
    metrics = json.loads((tmp_path / "split" / "metrics.json").read_text())
    config = metrics["config"]
    assert config["method"] == "wamal" and config["weight_range"] == 15.0 and config["weighting"] == "batch"
    assert config["aux_multiplier_bounds"] == [2.0**-15, 2.0**15]
    (record,) = metrics["epochs"]
    assert 2.0**-15 <= record["aux_multiplier_min"] <= record["aux_multiplier_mean"] <= record["aux_multiplier_max"]
    assert record["aux_multiplier_max"] <= 2.0**15 and 0 <= record["aux_multiplier_near_bounds"] <= 1
    assert record["train_weighted_aux_loss"] > 0 and record["train_aux_loss"] > 0
    published = {"WAMAL paper's abstract": 80.2, "WAMAL authors' README": 81.5}
    published["rl-aux notebook, a reproduction: one run, mean of its last 15 of 200 epochs"] = 81.31
    assert metrics["summary"]["published_test_primary_acc"] == published

    resumed = run_main(wamal, *common, "--epochs", "2", "--run-name", "split", "--resume")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    straight = run_main(wamal, *common, "--epochs", "2", "--run-name", "straight")
    assert straight.returncode == 0, straight.stderr
    expected, got = (json.loads((tmp_path / r / "metrics.json").read_text())["epochs"] for r in ("straight", "split"))
    assert len(got) == 2
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in got] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in expected
    ]


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--weight-range", "0"], "--weight-range must be positive and below 128 (got 0.0)"),
        (["--weight-range", "-3"], "--weight-range must be positive and below 128 (got -3.0)"),
        (["--weight-range", "128"], "2^128 overflows float32"),
        (["--weight-range", "inf"], "--weight-range must be a finite number (got inf)"),
        (["--weight-range", "nan"], "--weight-range must be a finite number (got nan)"),
        (["--weighting", "each"], "argument --weighting: invalid choice: 'each'"),
    ],
)
def test_bad_weight_settings_are_refused(data_root, tmp_path, extra, phrase):
    result = run_main(wamal, *flags(data_root, tmp_path / "results", *extra))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, 200.0])
def test_check_config_refuses_a_weight_range_outside_the_open_interval(value):
    with pytest.raises(experiment.UsageError, match="weight_range in Config must be positive and below 128"):
        wamal.check_config(wamal.Config(weight_range=value))
    if math.isfinite(value):
        with pytest.raises(experiment.UsageError, match="--weight-range must be positive and below 128"):
            wamal.check_config(experiment.parse_flags(wamal.Config, ["--weight-range", str(value)]))


def test_check_config_refuses_an_unknown_weighting_written_into_the_file():
    with pytest.raises(experiment.UsageError, match="weighting = 'Sample' in Config is not one of sample, batch"):
        wamal.check_config(wamal.Config(weighting="Sample"))
