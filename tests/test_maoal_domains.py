"""MAOAL's multi-domain task (model_vgg_maoal.py --task domains, the authors' CIFAR-100/20) and its aux mode
(AuxiLearn): the domain split against CIFAR-100's class table, one step of every mode against a hand computation
on a tiny network (the gcs gate per auxiliary loss, lambda scaled by 1/K, AuxiLearn's combiner and its gradient),
and the script end to end on synthetic data: every mode, resume with the auxiliary loaders' RNG."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FAST, run_main
from torch.func import functional_call

import create_dataset
import experiment
import model_vgg_maoal as maoal
from create_dataset import COARSE_LABEL_NAMES, DOMAIN_LABEL, FINE_LABEL_NAMES, FINE_TO_COARSE, domain_classes

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# The domain split


def test_the_domains_are_cifar100s_superclasses_with_their_classes_in_ascending_order():
    assert COARSE_LABEL_NAMES[14] == "people"
    assert [FINE_LABEL_NAMES[f] for f in domain_classes(14)] == ["baby", "boy", "girl", "man", "woman"]
    for domain in range(20):
        classes = domain_classes(domain)
        assert len(classes) == 5 and list(classes) == sorted(classes)
        assert all(FINE_TO_COARSE[f] == domain for f in classes)
        assert [DOMAIN_LABEL[f] for f in classes] == [0, 1, 2, 3, 4]
    assert sorted(f for d in range(20) for f in domain_classes(d)) == list(range(100))


def domain_config(data_root, **changes):
    return maoal.check_config(
        maoal.Config(task="domains", data_root=str(data_root), download=False, workers=0, device="cpu", **changes)
    )


def test_split_data_and_the_developing_set_take_the_target_and_the_auxiliary_domains(data_root):
    cfg = domain_config(data_root, batch_size=4, dev_fraction=0.2, aux_domains="0-2")
    train, test = create_dataset.load_datasets(cfg)
    train, test, auxiliary = maoal.split_data(train, test, cfg)  # as main() does: the split, then the held-out set
    train, dev = train.split(maoal.held_out(train, cfg), held_out_transform=test.transform)
    loaders = create_dataset.make_loaders(cfg, torch.device("cpu"), train, test, dev, auxiliary)
    train, test, dev = loaders.train.dataset, loaders.test.dataset, loaders.dev.dataset
    for part in (train, test, dev):
        assert (part.labels[:, 2] == 14).all()
    assert len(train) + len(dev) == 10 and len(dev) == 2  # synthetic: 2 train images per fine class
    assert sorted(maoal.domain_targets(dev.labels).tolist()) == [0, 1]  # stratified: the first two classes
    assert [sorted(set(a.dataset.labels[:, 2].tolist())) for a in loaders.auxiliary] == [[0], [1], [2]]
    # each auxiliary loader shuffles by its own generator, checkpointed with the others
    states = experiment.rng_state(loaders)["auxiliary_loaders"]
    assert len(states) == 3 and not torch.equal(states[0], states[1])


# ---------------------------------------------------------------------------------------------
# One step of every mode on a tiny network, against a hand computation


class TinyDomainNet(maoal.DomainNet):
    """DomainNet's layout (five one-conv blocks, a linear head per domain) at a few channels."""

    def __init__(self, num_classes: int, num_auxiliary: int, backbone=None, renormalize: bool = True, channels=3):
        nn.Module.__init__(self)
        self.backbone, self.num_features, self.renormalize = None, channels, renormalize
        self.block1 = maoal.conv_block(3, channels, 1)
        for i in range(2, 6):
            setattr(self, f"block{i}", maoal.conv_block(channels, channels, 1))
        self.classifier1 = nn.Linear(channels, num_classes)
        self.auxiliary = nn.ModuleList(nn.Linear(channels, num_classes) for _ in range(num_auxiliary))
        self.register_buffer("input_scale", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", torch.zeros(1, 3, 1, 1), persistent=False)


def domain_batch(n: int, seed: int, domain: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g, dtype=F64)
    fine = torch.tensor(domain_classes(domain))[torch.randint(0, 5, (n,), generator=g)]
    labels = torch.zeros(n, 4, dtype=torch.long)
    labels[:, 2], labels[:, 3] = domain, fine
    return images, labels


TINY = maoal.Config(task="domains", aux_domains="0-1", lr=0.1, momentum=0.0, weight_decay=0.0, channels_last=False)


def tiny_state(cfg, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = TinyDomainNet(5, 2).double()
    state = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=cfg.lr), "forward_model": model}
    state["module_weights"] = maoal.ModuleWeights(2, 5).double()
    with torch.no_grad():
        state["module_weights"].rho.copy_(RHO)  # float64: 0.3 in float32 is another number
    if cfg.mode == "aux":
        state["combiner"] = maoal.LossCombiner(3, (4, 2)).double()
    return state


def by_hand(state, batches, cfg, trunk_weights_of):
    """Parameters after one SGD step, each loss's gradient taken apart here: trunk tensor of module b gets
    g_pri + sum_k W[k, b] g_k, the target head g_pri, auxiliary head k c_k g_k."""
    model = state["model"]
    named = dict(model.named_parameters())
    (x, y), aux = batches[0], batches[1:]
    primary = F.cross_entropy(model(x)[0], maoal.domain_targets(y))
    losses = [F.cross_entropy(model(a)[1][k], maoal.domain_targets(b)) for k, (a, b) in enumerate(aux)]
    grads = [dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True, retain_graph=True)))
             for loss in [primary, *losses]]  # fmt: skip
    trunk = [k for k in named if k.startswith("block")]
    whole = [torch.cat([g[k].flatten() for k in trunk]) for g in grads]  # each loss's trunk gradient, one vector
    cosines = [F.cosine_similarity(whole[0], whole[i], dim=0) for i in (1, 2)]
    weights, head_scale = trunk_weights_of(torch.stack(cosines))
    after = {}
    for name, p in named.items():
        if name.startswith("block"):
            b = int(name[5]) - 1
            g = grads[0][name] + sum(weights[k, b] * grads[k + 1][name] for k in range(2))
        elif name.startswith("classifier1"):
            g = grads[0][name]
        else:
            k = int(name.split(".")[1])
            g = head_scale * grads[k + 1][name]
        after[name] = (p - cfg.lr * g).detach()
    return after, weights, losses


RHO = torch.tensor([[-1.0, 0.0, 0.5, 1.0, 2.0], [2.0, 1.0, 0.0, -1.0, 0.3]], dtype=F64)
HAND = {
    # maoal: lambda = softplus(rho) per (loss, module), times 1/K (the mean of the auxiliary losses), heads too
    "maoal": lambda cos: (F.softplus(RHO) / 2, 0.5),
    "equal": lambda cos: (torch.ones(2, 5, dtype=F64), 1.0),  # the sum of the losses
    # the paper's gcs: each loss on in every module or in none, by its one cosine over the whole trunk
    "gcs": lambda cos: ((cos > 0).to(F64)[:, None].expand(2, 5), 1.0),
}


@pytest.mark.parametrize("mode", ["maoal", "equal", "gcs"])
def test_one_step_of_each_mode_is_the_hand_computation(mode):
    cfg = maoal.check_config(dataclasses.replace(TINY, mode=mode))
    state = tiny_state(cfg)
    batches = [domain_batch(4, 1, 14), domain_batch(4, 2, 0), domain_batch(4, 3, 1)]
    expected, weights, _ = by_hand(state, batches, cfg, HAND[mode])
    out = maoal.train_step(state, *batches[0], cfg, aux_batches=batches[1:])
    for name, p in state["model"].named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-10, atol=1e-13, msg=name)
    reported = torch.stack([out[f"lambda_{m}"] for m in maoal.MODULES])
    torch.testing.assert_close(reported.to(F64), weights.mean(0) * (2 if mode == "maoal" else 1))


def combiner_by_hand(combiner: maoal.LossCombiner, losses: torch.Tensor) -> torch.Tensor:
    """AuxiLearn's combiner written out: weight-normalised layers, softplus between, mean, plus the primary loss."""
    x = losses
    for i, (v, g) in enumerate(zip(combiner.v, combiner.g)):
        w = torch.stack([g[r, 0] * v[r] / torch.sqrt((v[r] ** 2).sum()) for r in range(v.shape[0])])
        x = w @ x
        if i < len(combiner.b):
            x = torch.log1p(torch.exp(x + combiner.b[i]))
    return x.sum() + losses[0]


def test_the_combiner_is_monotone_and_its_gradient_is_the_chain_rule_by_hand():
    torch.manual_seed(0)
    combiner = maoal.LossCombiner(3, (4, 2)).double()
    losses = torch.tensor([0.7, 1.3, 2.1], dtype=F64, requires_grad=True)
    value = combiner(losses, losses[0])
    torch.testing.assert_close(value, combiner_by_hand(combiner, losses), rtol=1e-12, atol=0)
    slope = torch.autograd.grad(value, losses)[0]
    assert (slope >= 0).all() and slope[0] >= 1  # monotone; the primary loss also enters directly
    with torch.no_grad():
        combiner.v[0][0, 0] = -0.5
    combiner.clamp()
    assert combiner.v[0][0, 0] == 0 and all((p >= 0).all() for p in [*combiner.v, *combiner.g])


def test_an_aux_step_is_sgd_on_the_combined_loss():
    """The network's gradient is sum_i dC/dL_i * dL_i/dW, dC/dL_i from the combiner written out by hand."""
    cfg = maoal.check_config(dataclasses.replace(TINY, mode="aux"))
    state = tiny_state(cfg)
    batches = [domain_batch(4, 1, 14), domain_batch(4, 2, 0), domain_batch(4, 3, 1)]
    model = state["model"]
    named = dict(model.named_parameters())
    (x, y), aux = batches[0], batches[1:]
    losses = [F.cross_entropy(model(x)[0], maoal.domain_targets(y))]
    losses += [F.cross_entropy(model(a)[1][k], maoal.domain_targets(b)) for k, (a, b) in enumerate(aux)]
    point = torch.stack(losses).detach().requires_grad_()
    slopes = torch.autograd.grad(combiner_by_hand(state["combiner"], point), point)[0]
    grads = [torch.autograd.grad(loss, list(named.values()), allow_unused=True, retain_graph=True) for loss in losses]
    expected = {
        name: (p - cfg.lr * sum(s * (g[i] if g[i] is not None else 0) for s, g in zip(slopes, grads))).detach()
        for i, (name, p) in enumerate(named.items())
    }
    maoal.train_step(state, x, y, cfg, aux_batches=aux)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-10, atol=1e-13, msg=name)
    assert all(p.grad is None for p in state["combiner"].parameters())  # the lower level leaves the combiner


# ---------------------------------------------------------------------------------------------
# End to end


def flags(data_root, results, *extra) -> list[str]:
    return ["--data-root", str(data_root), "--results-dir", str(results), *FAST, "--task", "domains", *extra]


@pytest.mark.parametrize("mode", maoal.MODES)
def test_every_mode_runs_the_domains_task_end_to_end(data_root, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(maoal, "DomainNet", TinyDomainNet)
    monkeypatch.setattr(maoal, "RESNET_MODULES", maoal.MODULES)  # the tiny network has VGG's block names
    result = run_main(
        maoal,
        *flags(data_root, tmp_path, "--mode", mode, "--epochs", "1", "--limit-batches", "1", "--batch-size", "4"),
        *("--dev-fraction", "0.2", "--aux-domains", "0-2", "--run-name", "r"),
        *(["--meta-every", "1"] if mode in ("maoal", "aux") else []),  # the upper level's: refused in other modes
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["config"]["task"] == "domains" and metrics["config"]["aux_domain_list"] == [0, 1, 2]
    assert metrics["config"]["target_classes"] == list(domain_classes(14))
    summary = metrics["summary"]
    assert "best_test_primary_acc_chosen_on_test_set" in summary and "last5_mean_test_primary_acc" in summary
    assert "CIFAR-100/20" in summary["unpublished_because"]
    (record,) = metrics["epochs"]
    assert ("dev_primary_loss" in record) == (mode in ("maoal", "aux")) and "test_aux_acc" not in record


def test_resume_repeats_a_domains_run_exactly(data_root, tmp_path, monkeypatch):
    """The auxiliary loaders' RNG comes back from the checkpoint: two epochs straight equal one, then one resumed."""
    monkeypatch.setattr(maoal, "DomainNet", functools.partial(TinyDomainNet, channels=4))
    monkeypatch.setattr(maoal, "RESNET_MODULES", maoal.MODULES)
    common = flags(data_root, tmp_path, "--limit-batches", "2", "--batch-size", "4", "--dev-fraction", "0.2")
    common += ["--meta-every", "1", "--aux-domains", "0-1", "--lr-schedule", "step"]  # cosine follows --epochs
    assert run_main(maoal, *common, "--epochs", "2", "--run-name", "straight").returncode == 0
    assert run_main(maoal, *common, "--epochs", "1", "--run-name", "split").returncode == 0
    assert run_main(maoal, *common, "--epochs", "2", "--run-name", "split", "--resume").returncode == 0

    def history(name):
        epochs = json.loads((tmp_path / name / "metrics.json").read_text())["epochs"]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in epochs]

    assert history("split") == history("straight") and len(history("straight")) == 2


def test_a_cosine_run_resumes_over_its_own_schedule_only(data_root, tmp_path, monkeypatch):
    """The cosine schedule anneals over the --epochs a run started with: another --epochs on resume is refused in
    one line and leaves the run as it was; the finished run says to train longer in a new run."""
    monkeypatch.setattr(maoal, "DomainNet", functools.partial(TinyDomainNet, channels=4))
    monkeypatch.setattr(maoal, "RESNET_MODULES", maoal.MODULES)
    common = flags(data_root, tmp_path, "--limit-batches", "1", "--batch-size", "4", "--dev-fraction", "0.2")
    common += ["--mode", "equal", "--aux-domains", "0-1", "--run-name", "r"]
    assert run_main(maoal, *common, "--epochs", "1").returncode == 0
    before = {name: (tmp_path / "r" / name).read_bytes() for name in ("checkpoint.pt", "metrics.json")}
    longer = run_main(maoal, *common, "--epochs", "3", "--resume")
    assert longer.returncode == 2 and longer.stdout == ""
    assert longer.stderr.count("\n") == 1 and "over 1 epoch (a cosine schedule" in longer.stderr
    assert "resume with --epochs 1" in longer.stderr
    assert {name: (tmp_path / "r" / name).read_bytes() for name in before} == before
    same = run_main(maoal, *common, "--epochs", "1", "--resume")
    assert same.returncode == 0 and "already finished 1 epoch; train longer in a new run" in same.stdout


def test_the_real_network_is_torchvisions_resnet18_with_the_cifar_stem_and_its_modules():
    cfg = maoal.check_config(maoal.Config(task="domains"))
    model = maoal.make_network(cfg)
    assert isinstance(model.backbone.maxpool, nn.Identity) and model.backbone.conv1.stride == (1, 1)
    modules = maoal.trunk_modules(model)
    names = [n for n, _ in model.named_parameters() if n.startswith("backbone.")]
    assert len(modules) == len(names) == len(model.shared_parameters())
    for n, m in zip(names, modules):
        part = n.split(".")[1]
        assert maoal.RESNET_MODULES[m] == (part if part.startswith("layer") else "stem"), n
    assert len(model.auxiliary) == 10 and model.classifier1.out_features == 5
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_schedule) == (32, 0.1, 0.9, 5e-4, "cosine")
    assert (cfg.meta_every, cfg.lambda_optimizer, cfg.lambda_lr, cfg.focal_gamma) == (10, "adam", 1e-2, 0.0)


def test_renormalising_is_normalising_by_cifar100s_statistics():
    x = torch.rand(2, 3, 32, 32)
    ours = (x - 0.5) / 0.2
    theirs = (x - torch.tensor(maoal.CIFAR100_MEAN).view(1, 3, 1, 1)) / torch.tensor(maoal.CIFAR100_STD).view(
        1, 3, 1, 1
    )
    net = maoal.DomainNet(5, 1, None, True)
    torch.testing.assert_close(ours * net.input_scale + net.input_shift, theirs, rtol=1e-5, atol=1e-5)
    assert np.isclose(net.input_scale.flatten()[0].item(), 0.2 / 0.2675)


def test_the_combiners_hypergradient_is_the_truncated_implicit_gradient_in_dense_matrices():
    """AuxiLearn's upper level with dense matrices: -(d^2 L / d phi dW) alpha sum_j (I - alpha H)^j dL_dev/dW,
    H = d^2 L / dW^2 of the combined training loss L(W, phi); the script takes it by vector-Jacobian products."""
    alpha, terms = 0.05, 3
    changes = dict(mode="aux", authors_neumann_sum=False, combiner_alpha=alpha, neumann_terms=terms)
    cfg = maoal.check_config(dataclasses.replace(TINY, **changes))
    torch.manual_seed(0)
    model = TinyDomainNet(5, 2, channels=1).double()  # one channel: the dense Hessian has 150 rows
    combiner = maoal.LossCombiner(3, (4, 2)).double()
    batches = [domain_batch(2, 1, 14), domain_batch(2, 2, 0), domain_batch(2, 3, 1)]
    dev_images, dev_labels = domain_batch(2, 4, 14)
    got, _, _ = maoal.combiner_hypergradient(model, combiner, batches, dev_images, dev_labels, cfg)

    def unflatten(flat: torch.Tensor, module: nn.Module) -> dict:
        out, start = {}, 0
        for name, p in module.named_parameters():
            out[name], start = flat[start : start + p.numel()].view(p.shape), start + p.numel()
        return out

    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    phi0 = torch.cat([p.detach().flatten() for p in combiner.parameters()])
    n = len(w0)

    def train_loss(z: torch.Tensor) -> torch.Tensor:
        forward = maoal.functional_forward(model, unflatten(z[:n], model))
        primary, aux, _ = maoal.step_losses(model, batches, cfg, forward)
        return functional_call(combiner, unflatten(z[n:], combiner), (torch.stack([primary, *aux]), primary))

    def dev_loss(w: torch.Tensor) -> torch.Tensor:
        forward = maoal.functional_forward(model, unflatten(w, model))
        return maoal.dev_loss_and_acc(forward, dev_images, dev_labels, cfg)[0]

    hessian = torch.autograd.functional.hessian(train_loss, torch.cat([w0, phi0]), vectorize=True)
    h_ww, h_phiw = hessian[:n, :n], hessian[n:, :n]
    step = torch.eye(n, dtype=F64) - alpha * h_ww.T
    series = alpha * sum(torch.linalg.matrix_power(step, j) for j in range(terms + 1))
    expected = -h_phiw @ (series @ torch.autograd.functional.jacobian(dev_loss, w0))
    assert expected.norm() > 0
    torch.testing.assert_close(torch.cat([g.flatten() for g in got]), expected, rtol=1e-8, atol=1e-12)
