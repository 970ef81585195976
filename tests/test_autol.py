"""Auto-Lambda (model_vgg_autol.py) on its authors' CIFAR-100 multi-domain task: the exact meta-gradient against
double backward in float64, the authors' finite difference converging to it, the virtual step against the
optimiser's own step and the authors' formula, DWA and the uncertainty weighting against hand computations, the
domain split against CIFAR-100's class table, and the script end to end on synthetic data, resumed exactly."""

from __future__ import annotations

import copy
import functools
import json
import math
import signal

import numpy as np
import pytest
import torch
from conftest import FAST, run_main

import create_dataset
import experiment
import model_vgg_autol as autol
from create_dataset import COARSE_LABEL_NAMES, FINE_LABEL_NAMES, FINE_TO_COARSE, domain_classes

F64 = torch.float64
TINY_FILTERS = (4, "M", 4)  # MTLVGG16's layout (conv, per-task BatchNorm, ReLU, max-pool), a few channels


def tiny_problem(momentum_steps: int = 2, num_tasks: int = 3, seed: int = 0):
    """A float64 MTLVGG16 of a few channels, a batch per task and a meta batch, SGD as the authors' (momentum 0.9,
    weight decay 5e-4) after `momentum_steps` real steps, so that the momentum buffers are not zero."""
    torch.manual_seed(seed)
    model = autol.MTLVGG16(num_tasks, filters=TINY_FILTERS).double()

    def batch(n=4):
        return torch.randn(n, 3, 8, 8, dtype=F64), torch.randint(0, 5, (n,))

    task_batches = [batch() for _ in range(num_tasks)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(momentum_steps):
        optimizer.zero_grad()
        autol.task_losses(model, task_batches).sum().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    weights = torch.tensor([0.3, 0.1, 0.7][:num_tasks], dtype=F64)
    return model, optimizer, task_batches, batch(), weights


def meta_gradient(problem, method: str, **kwargs):
    model, optimizer, task_batches, meta_batch, weights = problem
    return autol.meta_gradient(
        model=model, optimizer=optimizer, task_batches=task_batches, meta_batch=meta_batch, primary=1,
        weights=weights, method=method, **kwargs,
    )  # fmt: skip


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


# ---------------------------------------------------------------------------------------------
# The meta-gradient


@pytest.mark.parametrize("momentum_steps", [0, 2])
def test_the_exact_meta_gradient_is_double_backwards_and_changes_nothing(momentum_steps):
    problem = tiny_problem(momentum_steps)
    model, optimizer = problem[0], problem[1]
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    exact, meta_loss = meta_gradient(problem, "second-order")
    oracle, oracle_loss = meta_gradient(problem, "double-backward")
    assert oracle.norm() > 0 and exact.dtype == F64
    assert relative_error(exact, oracle) < 1e-9
    assert torch.allclose(meta_loss, oracle_loss, rtol=1e-12)
    after = (model.state_dict(), optimizer.state_dict())
    for name, value in before[0].items():
        assert torch.equal(value, after[0][name]), name
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(
        before[1]["state"].get(0, {}).get("momentum_buffer", torch.zeros(1)),
        after[1]["state"].get(0, {}).get("momentum_buffer", torch.zeros(1)),
    )


def test_the_meta_gradient_is_the_derivative_of_the_primary_loss_after_the_optimisers_real_step():
    """J(lambda) by a copy of the network and its optimiser actually stepping on sum_i lambda_i L_i, differentiated
    by a central difference in lambda: the exact meta-gradient is its derivative (no virtual_step involved)."""
    problem = tiny_problem()
    model, optimizer, task_batches, (meta_images, meta_target), weights = problem
    exact, _ = meta_gradient(problem, "second-order")

    def meta_loss(lambdas: torch.Tensor) -> float:
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its buffers are stepped in place
        (lambdas * autol.task_losses(net, task_batches)).sum().backward()
        opt.step()
        with torch.no_grad():
            return autol.task_loss(net(meta_images, 1), meta_target).item()

    h = 1e-5
    numeric = torch.tensor(
        [(meta_loss(weights + h * e) - meta_loss(weights - h * e)) / (2 * h) for e in torch.eye(3, dtype=F64)]
    )
    assert relative_error(exact, numeric) < 1e-6


def test_the_authors_finite_difference_converges_to_the_exact_meta_gradient():
    """Within ReLU's and max-pool's kinks the central difference's error falls with the square of the step; at the
    authors' step (0.01) a kink lies inside it here, and the difference is 1% off."""
    problem = tiny_problem()
    exact, _ = meta_gradient(problem, "second-order")
    errors = [
        relative_error(meta_gradient(problem, "finite-difference", fd_step=step)[0], exact)
        for step in (1e-2, 1e-3, 1e-4)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-8, errors
    assert errors[1] / errors[2] > 20  # quadratic: 100 for a tenth of the step


@pytest.mark.parametrize("momentum_steps", [0, 2])
def test_the_virtual_step_is_the_optimisers_step_and_the_authors_formula(momentum_steps):
    model, optimizer, task_batches, _, weights = tiny_problem(momentum_steps)
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = (weights * autol.task_losses(model, task_batches)).sum()
    grads = dict(zip(theta, torch.autograd.grad(loss, list(model.parameters()))))
    buffers = autol.momentum_buffers(model, optimizer)
    assert all((b is None) == (momentum_steps == 0) for b in buffers.values())
    got = autol.virtual_step(theta, grads, buffers, alpha=0.1, momentum=0.9, weight_decay=5e-4)
    # The authors' virtual_step (lorenmt/auto-lambda, auto_lambda.py): m = buffer * momentum, or 0 before any step.
    for name, p in theta.items():
        m = 0.0 if buffers[name] is None else buffers[name] * 0.9
        torch.testing.assert_close(got[name], p - 0.1 * (m + grads[name] + 5e-4 * p), rtol=0, atol=1e-15)
    optimizer.zero_grad()
    (weights * autol.task_losses(model, task_batches)).sum().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# The weightings


def test_dwa_is_k_times_the_softmax_of_the_loss_ratios_over_the_temperature():
    last, before = torch.tensor([1.0, 2.0, 0.5], dtype=F64), torch.tensor([2.0, 2.0, 0.25], dtype=F64)
    exps = [math.exp(r / 2.0) for r in (0.5, 1.0, 2.0)]
    expected = torch.tensor([3 * e / sum(exps) for e in exps], dtype=F64)
    torch.testing.assert_close(autol.dwa_weights(last, before, 2.0), expected, rtol=1e-14, atol=0)
    # In a run: 1 for the first two epochs, then from the two epochs before (the authors' index 0 and 1, then 2).
    weights = autol.TaskWeights(3, autol.Config(weighting="dwa")).double()
    seen = []
    for losses in (before, last, torch.ones(3, dtype=F64)):
        weights.start_epoch()
        seen.append(weights.weights().clone())
        weights.end_epoch(losses)
    assert torch.equal(seen[0], torch.ones(3, dtype=F64)) and torch.equal(seen[1], torch.ones(3, dtype=F64))
    torch.testing.assert_close(seen[2], expected, rtol=1e-14, atol=0)
    assert torch.equal(weights.loss(torch.ones(3, dtype=F64)), weights.weights().sum())


def test_the_uncertainty_weighting_is_the_authors_formula_and_learns_its_log_variances():
    losses = torch.tensor([1.0, 2.0], dtype=F64)
    s = torch.tensor([-0.7, 0.3], dtype=F64, requires_grad=True)
    loss = autol.uncertainty_loss(losses, s)
    expected = 1 / (2 * math.exp(-0.7)) * 1.0 - 0.35 + 1 / (2 * math.exp(0.3)) * 2.0 + 0.15
    assert math.isclose(loss.item(), expected, rel_tol=1e-14)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(
        grad, torch.tensor([-1.0 / (2 * math.exp(-0.7)) + 0.5, -1.0 / math.exp(0.3) + 0.5], dtype=F64)
    )
    cfg = autol.check_config(autol.Config(weighting="uncert"))
    state = autol.build(cfg, torch.device("cpu"))
    assert any(p is state["task_weights"].log_variance for p in state["optimizer"].param_groups[0]["params"])
    torch.testing.assert_close(state["task_weights"].weights(), torch.full((20,), 1 / (2 * math.exp(-0.7))))


# ---------------------------------------------------------------------------------------------
# The network and the domains


def test_the_network_is_the_authors_mtlvgg16_and_their_normalisation():
    model = autol.MTLVGG16(20)
    names = [name for name, _ in model.named_parameters()]
    assert "network_block.1.bn_list.19.weight" in names and "classifier.19.0.bias" in names  # their keys
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 13
    # VGG-16's 13 convolutions (14,714,688 parameters), 20 BatchNorms of each, 20 linear heads of 512 -> 5.
    channels = 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512
    assert sum(p.numel() for p in model.parameters()) == 14_714_688 + 20 * 2 * channels + 20 * (512 * 5 + 5)
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(autol.CIFAR100_MEAN).view(1, 3, 1, 1), torch.tensor(autol.CIFAR100_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(autol.renormalized(model, (x - 0.5) / 0.2), (x - mean) / std)
    assert model(torch.randn(2, 3, 32, 32), 7).shape == (2, 5)
    logits, target = torch.randn(6, 5, dtype=F64), torch.randint(0, 5, (6,))
    torch.testing.assert_close(autol.task_loss(logits, target), torch.nn.functional.cross_entropy(logits, target))


def test_the_domains_are_the_superclasses_their_classes_renumbered_as_the_authors_do():
    assert COARSE_LABEL_NAMES[14] == "people"
    assert [FINE_LABEL_NAMES[f] for f in domain_classes(14)] == ["baby", "boy", "girl", "man", "woman"]
    fine = np.arange(100)
    for domain in range(20):
        mine = fine[np.asarray(FINE_TO_COARSE) == domain]
        # The authors' CIFAR100MTL: np.unique(targets of the domain, return_inverse=True)[1].
        theirs = np.unique(mine, return_inverse=True)[1]
        labels = torch.zeros(5, 4, dtype=torch.long)
        labels[:, 3] = torch.from_numpy(mine)
        assert autol.domain_targets(labels).tolist() == theirs.tolist()
        assert [FINE_LABEL_NAMES[f] for f in mine] == sorted(FINE_LABEL_NAMES[f] for f in mine)


def test_split_domains_gives_each_task_its_own_superclass_and_autol_a_second_shuffle(data_root):
    cfg = autol.check_config(
        autol.Config(data_root=str(data_root), download=False, device="cpu", workers=0, batch_size=4, primary_domain=3)
    )
    assert autol.task_domains(cfg) == tuple(range(20))
    train, test = create_dataset.load_datasets(cfg)
    primary, primary_test, dev, others = autol.split_domains(train, test, cfg)
    assert dev is None and len(others) == 20  # 19 other domains, then the primary domain again (autol)
    assert set(primary.labels[:, 2].tolist()) == {3} == set(primary_test.labels[:, 2].tolist())
    assert [sorted(set(s.labels[:, 2].tolist())) for s in others] == [[d] for d in (*range(3), *range(4, 20), 3)]
    loaders = create_dataset.make_loaders(cfg, torch.device("cpu"), primary, primary_test, dev, others)
    first = [torch.cat([x for x, _ in loader]) for loader in (loaders.train, loaders.auxiliary[-1])]
    assert not torch.equal(first[0], first[1])  # the meta batches come in another order
    cfg = autol.check_config(autol.Config(weighting="equal", primary_domain=14, aux_domains="0-9"))
    assert autol.task_domains(cfg) == (*range(10), 14) and autol.build(cfg, torch.device("cpu"))["primary_task"] == 10


# ---------------------------------------------------------------------------------------------
# The script end to end


def flags(data_root, tmp_path, *extra):
    return [*FAST, "--data-root", data_root, "--results-dir", tmp_path, "--batch-size", "5", *extra]


@pytest.fixture
def tiny_network(monkeypatch):
    monkeypatch.setattr(autol, "MTLVGG16", functools.partial(autol.MTLVGG16, filters=TINY_FILTERS))


def history(path):
    epochs = json.loads((path / "metrics.json").read_text())["epochs"]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in epochs]


@pytest.mark.parametrize("weighting", ["equal", "dwa", "uncert", "autol"])
def test_each_weighting_trains_one_epoch(data_root, tmp_path, tiny_network, weighting):
    extra = ["--meta-grad", "double-backward"] if weighting == "autol" else []  # the oracle runs in the script too
    args = flags(data_root, tmp_path, "--weighting", weighting, "--epochs", "1", "--run-name", "r", *extra)
    result = run_main(autol, *args)
    assert result.returncode == 0, result.stderr
    (record,) = history(tmp_path / "r")
    assert {f"train_loss_{d}" for d in range(20)} | {f"lambda_{d}" for d in range(20)} <= set(record)
    assert ("meta_primary_loss" in record) == (weighting == "autol") and 0 <= record["test_primary_acc"] <= 1
    lambdas = [record[f"lambda_{d}"] for d in range(20)]
    if weighting == "autol":  # two Adam steps of about 3e-4 each from 0.1
        assert all(abs(w - 0.1) < 2.5 * 3e-4 for w in lambdas) and lambdas != [0.1] * 20
    elif weighting != "uncert":
        assert lambdas == [1.0] * 20
    else:
        # Each loss (about ln 5) exceeds 2 exp(s) / 2: its log variance grows, its weight falls from 1 / (2 exp(-0.7)).
        assert all(0 < w < 1 / (2 * math.exp(-0.7)) for w in lambdas)


def test_an_autol_run_resumes_exactly(data_root, tmp_path, tiny_network, monkeypatch):
    """Two epochs straight equal one epoch, an interrupt, and the rest resumed: the meta batches' loader RNG, Adam's
    state and lambda come back from the checkpoint."""
    common = flags(data_root, tmp_path, "--epochs", "2", "--meta-grad", "finite-difference")
    assert run_main(autol, *common, "--run-name", "straight").returncode == 0
    epoch_line = autol.epoch_line

    def interrupted_after_the_first(record, *args):
        if record["epoch"] == 1:
            raise experiment.Interrupted(signal.SIGINT)
        return epoch_line(record, *args)

    handlers = {s: signal.getsignal(s) for s in experiment.SIGNALS}
    monkeypatch.setattr(autol, "epoch_line", interrupted_after_the_first)
    try:
        stopped = run_main(autol, *common, "--run-name", "split")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert stopped.returncode == 128 + signal.SIGINT and "--resume" in stopped.stderr
    monkeypatch.setattr(autol, "epoch_line", epoch_line)
    assert len(history(tmp_path / "split")) == 1
    assert run_main(autol, *common, "--run-name", "split", "--resume").returncode == 0
    straight = history(tmp_path / "straight")
    assert history(tmp_path / "split") == straight and len(straight) == 2
    assert straight[1]["lambda_0"] != 0.1 and "meta_primary_loss" in straight[1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dwa-temperature", "3"], "--dwa-temperature 3.0 is used with --weighting dwa only"),
        (["--weighting", "dwa", "--meta-grad", "finite-difference"], "is used with --weighting autol only"),
        (["--fd-step", "0.1"], "is used with --meta-grad finite-difference only"),
        (["--aux-domains", "0,0"], "each once"),
        (["--primary-domain", "3", "--aux-domains", "0-5"], "each once, and not --primary-domain 3"),
        (["--primary-domain", "20"], "superclasses are 0-19"),
        (["--dataset", "cifar10"], "runs on cifar100 only"),
    ],
)
def test_settings_that_cannot_run_are_refused_in_one_line(data_root, tmp_path, extra, message):
    result = run_main(autol, *flags(data_root, tmp_path, *extra))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


# ---------------------------------------------------------------------------------------------
# MAOAL's task


def test_maoal_domains_holds_out_maoals_developing_set_and_trains_on_the_rest(data_root):
    import model_vgg_maoal as maoal

    cfg = autol.check_config(autol.Config(task="maoal-domains", data_root=str(data_root), dev_fraction=0.2))
    assert (cfg.primary_domain, cfg.aux_domains, cfg.backbone) == (14, "0-9", "resnet18")
    assert autol.task_domains(cfg) == (*range(10), 14)
    theirs = maoal.check_config(maoal.Config(task="domains", data_root=str(data_root), dev_fraction=0.2))
    train, test = create_dataset.load_datasets(cfg)
    target = maoal.split_data(train, test, theirs)[0]
    assert np.array_equal(autol.held_out(target, cfg), maoal.held_out(target, theirs))
    primary, _, _, others = autol.split_domains(train, test, cfg)
    assert len(primary) == len(target) - 2 and len(others) == 11  # 10 auxiliary domains, the second shuffle
    assert len(others[-1]) == len(primary)


def test_an_autol_run_on_maoals_task(data_root, tmp_path, monkeypatch):
    def tiny_backbone(cfg):
        """A headless network as make_backbone returns one (ResNet-18's layout at a few channels: too slow here)."""
        network = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
        )
        network.append(torch.nn.Flatten()).num_features = 4
        return network

    monkeypatch.setattr(autol, "make_backbone", tiny_backbone)
    args = flags(data_root, tmp_path, "--task", "maoal-domains", "--dev-fraction", "0.2", "--epochs", "1")
    result = run_main(autol, *args, "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    (run,) = list(tmp_path.iterdir())
    assert run.name.startswith("autol-autol-second-order-maoal-domain14-aux0-9-seed0-")
    (record,) = history(run)
    assert {f"lambda_{d}" for d in (*range(10), 14)} <= set(record) and "lambda_10" not in record


def test_the_speed_benchmark_times_auto_lambda_and_its_equal_baseline(tmp_path, tiny_network, capsys):
    """benchmarks/speed.py's autol rows (here on the tiny network, batch 2): a step of all 20 domains counted as 20
    iterations; the meta step adds work to the training step."""
    from benchmarks import speed

    out = tmp_path / "speed.json"
    flags = ["--batch-size", "2", "--warmup", "0", "--iters", "1", "--device", "cpu", "--json", str(out)]
    speed.main(["--methods", "autol-second-order", "autol-equal", *flags])
    rows = {row["method"]: row for row in json.loads(out.read_text())["devices"][0]["rows"]}
    autol_row, equal = rows["autol-second-order"], rows["autol-equal"]
    assert set(autol_row["phase_ms_median"]) == {"phase 1", "phase 2"} and set(equal["phase_ms_median"]) == {"phase 1"}
    phases = autol_row["phase_ms_median"]
    assert autol_row["ms_median"] == pytest.approx((phases["phase 1"] + phases["phase 2"]) / 20, rel=1e-6)
    assert autol_row["tflop_per_iter"] > equal["tflop_per_iter"] > 0 and autol_row["meta_grad"] == "second-order"
    assert "autol-second-order" in capsys.readouterr().out
