"""The networks and the focal loss of the three scripts: the reference's state-dict layout, its
initialisation, logits out of every forward, the focal loss against its formula, the shared Config
fields across scripts, and functional_call matching the module's forward."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import default_name
from torch.func import functional_call

import experiment
import model_vgg_human as human
import model_vgg_maxl as maxl
import model_vgg_single as single

SCRIPTS = {"maxl": maxl, "human": human, "single": single}
F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# The reference's layout, written out from the description (maxl-reference.md), not from the modules.

# block -> (input channels, output channels, number of convs); conv i sits at index 3 * i, its BatchNorm at 3 * i + 1.
VGG_BLOCKS = {
    "block1": (3, 64, 2),
    "block2": (64, 128, 2),
    "block3": (128, 256, 3),
    "block4": (256, 512, 3),
    "block5": (512, 512, 3),
}
CONV_INDICES = {2: (0, 3), 3: (0, 3, 6)}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_trunk_layout() -> dict[str, tuple[int, ...]]:
    """state-dict key -> shape of the reference's VGG-16 trunk."""
    layout = {}
    for block, (c_in, c_out, num_convs) in VGG_BLOCKS.items():
        for k, i in enumerate(CONV_INDICES[num_convs]):
            layout[f"{block}.{i}.weight"] = (c_out, c_in if k == 0 else c_out, 3, 3)
            layout[f"{block}.{i}.bias"] = (c_out,)
            for key in BN_KEYS:
                layout[f"{block}.{i + 1}.{key}"] = () if key == "num_batches_tracked" else (c_out,)
    return layout


def expected_head_layout(name: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Linear(512, 512) at index 0, ReLU at 1, Linear(512, C) at index 2."""
    return {
        f"{name}.0.weight": (512, 512),
        f"{name}.0.bias": (512,),
        f"{name}.2.weight": (num_classes, 512),
        f"{name}.2.bias": (num_classes,),
    }


# The explicit key list of the trunk (91 keys), as the reference's checkpoints hold it.
TRUNK_KEYS = [
    *(f"block1.{i}.{k}" for i in (0,) for k in ("weight", "bias")),
    *(f"block1.{i}.{k}" for i in (1,) for k in BN_KEYS),
    *(f"block1.{i}.{k}" for i in (3,) for k in ("weight", "bias")),
    *(f"block1.{i}.{k}" for i in (4,) for k in BN_KEYS),
    *(f"block2.{i}.{k}" for i in (0,) for k in ("weight", "bias")),
    *(f"block2.{i}.{k}" for i in (1,) for k in BN_KEYS),
    *(f"block2.{i}.{k}" for i in (3,) for k in ("weight", "bias")),
    *(f"block2.{i}.{k}" for i in (4,) for k in BN_KEYS),
    *(
        key
        for b in ("block3", "block4", "block5")
        for conv, bn in ((0, 1), (3, 4), (6, 7))
        for key in (f"{b}.{conv}.weight", f"{b}.{conv}.bias", *(f"{b}.{bn}.{k}" for k in BN_KEYS))
    ),
]

# Parameter counts by hand: 13 convs of VGG-16 = 14,714,688 (the well-known number), 13 BatchNorms = 2 * 4224.
TRUNK_PARAMS = 14_714_688 + 8_448
HEAD_PARAMS = {20: 262_656 + 513 * 20, 100: 262_656 + 513 * 100}  # 512*512 + 512 + 512*C + C


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    """One network of each kind, as the scripts build them for the default experiment (float32)."""
    torch.manual_seed(0)
    return {
        "maxl": maxl.VGG16([5] * 20),
        "generator": maxl.LabelGenerator([5] * 20),
        "human": human.VGG16(20, 100),
        "single": single.VGG16(20),
    }


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# State-dict layout


def test_trunk_key_list_matches_its_description():
    """The explicit key list and the block table describe the same trunk (guards the expectations themselves)."""
    assert TRUNK_KEYS == list(expected_trunk_layout())
    assert len(TRUNK_KEYS) == 13 * 2 + 13 * 5


def test_maxl_multitask_state_dict_is_the_reference_layout(nets):
    expected = {
        **expected_trunk_layout(),
        **expected_head_layout("classifier1", 20),
        **expected_head_layout("classifier2", 100),
    }
    assert list(nets["maxl"].state_dict()) == list(expected)
    assert shapes(nets["maxl"]) == expected


def test_label_generator_state_dict_has_no_extra_keys(nets):
    """Trunk plus `classifier`; the mask is a non-persistent buffer, so reference checkpoints load both ways."""
    generator = nets["generator"]
    expected = {**expected_trunk_layout(), **expected_head_layout("classifier", 100)}
    assert list(generator.state_dict()) == list(expected)
    assert shapes(generator) == expected
    assert "log_mask" in dict(generator.named_buffers())  # it exists, it is only not saved
    generator.load_state_dict(copy.deepcopy(generator.state_dict()), strict=True)


def test_human_state_dict_equals_maxl_multitask_layout(nets):
    assert list(nets["human"].state_dict()) == list(nets["maxl"].state_dict())
    assert shapes(nets["human"]) == shapes(nets["maxl"])


def test_single_state_dict_is_trunk_plus_one_head(nets):
    expected = {**expected_trunk_layout(), **expected_head_layout("classifier", 20)}
    assert list(nets["single"].state_dict()) == list(expected)
    assert shapes(nets["single"]) == expected


def test_checkpoints_load_across_scripts(nets):
    """Same layout means a human checkpoint loads strictly into the MAXL multi-task network and vice versa."""
    target = copy.deepcopy(nets["maxl"])
    target.load_state_dict(nets["human"].state_dict(), strict=True)
    for key, value in nets["human"].state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["maxl", "generator", "human", "single"])
def test_trunk_ends_at_512_features_on_32x32(nets, name):
    net = nets[name].eval()
    with torch.no_grad():
        features = net.features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512)


def test_parameter_counts(nets):
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert sum(math.prod(s) for k, s in expected_trunk_layout().items() if "running" not in k and "num_" not in k) == (
        TRUNK_PARAMS
    )
    assert count(nets["maxl"]) == TRUNK_PARAMS + HEAD_PARAMS[20] + HEAD_PARAMS[100] == 15_310_008
    assert count(nets["generator"]) == TRUNK_PARAMS + HEAD_PARAMS[100] == 15_037_092
    assert count(nets["human"]) == 15_310_008
    assert count(nets["single"]) == TRUNK_PARAMS + HEAD_PARAMS[20] == 14_996_052
    shared = nets["maxl"].shared_parameters()
    assert sum(p.numel() for p in shared) == TRUNK_PARAMS
    assert len(shared) == 13 * 4  # conv weight, conv bias, BN weight, BN bias


# ---------------------------------------------------------------------------------------------
# Initialisation


def weighted_layers(module: nn.Module):
    return [(name, m) for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def xavier_bound(weight: torch.Tensor) -> float:
    """xavier_uniform's bound sqrt(6 / (fan_in + fan_out)); fan = channels times the kernel's area."""
    receptive = weight[0, 0].numel()
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("name", ["maxl", "generator", "human", "single"])
def test_batchnorm_and_bias_init(nets, name):
    net = nets[name]
    batchnorms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batchnorms) == 13
    for bn in batchnorms:
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    layers = weighted_layers(net)
    assert len(layers) == 13 + 2 * (2 if name in ("maxl", "human") else 1)
    for layer_name, layer in layers:
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias)), layer_name


@pytest.mark.parametrize("name", ["maxl", "human", "single"])
def test_multitask_and_single_weights_are_xavier_uniform(nets, name):
    for layer_name, layer in weighted_layers(nets[name]):
        w, bound = layer.weight.detach().double(), xavier_bound(layer.weight)
        assert w.abs().max() <= bound, layer_name
        # uniform(-a, a) has standard deviation a / sqrt(3); more than 1000 draws in every layer.
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), layer_name


def test_label_generator_weights_are_xavier_normal(nets):
    for layer_name, layer in weighted_layers(nets["generator"]):
        w, bound = layer.weight.detach().double(), xavier_bound(layer.weight)
        # xavier_normal: N(0, 2 / (fan_in + fan_out)), i.e. std = bound / sqrt(3); its tails pass the uniform bound.
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), layer_name
        assert w.abs().max() > bound, layer_name


def test_generator_and_multitask_init_differ_in_distribution(nets):
    """Same scale, different shape: the generator's weights have the normal's excess kurtosis 0, uniform's is -1.2."""
    kurtosis = lambda w: ((w - w.mean()) ** 4).mean() / w.var(unbiased=False) ** 2 - 3
    w_multi = nets["maxl"].block4[0].weight.detach().double()
    w_gen = nets["generator"].block4[0].weight.detach().double()
    assert kurtosis(w_multi).item() == pytest.approx(-1.2, abs=0.05)
    assert kurtosis(w_gen).item() == pytest.approx(0.0, abs=0.05)


# ---------------------------------------------------------------------------------------------
# Forward passes return logits


def test_forwards_return_logits_with_the_right_shapes(nets):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outputs = {
            "maxl": nets["maxl"].eval()(x),
            "human": nets["human"].eval()(x),
            "single": (nets["single"].eval()(x),),
        }
        labels = nets["generator"].eval()(x, torch.tensor([0, 7, 19]))
    assert [tuple(o.shape) for o in outputs["maxl"]] == [(3, 20), (3, 100)]
    assert [tuple(o.shape) for o in outputs["human"]] == [(3, 20), (3, 100)]
    assert [tuple(o.shape) for o in outputs["single"]] == [(3, 20)]
    for name, outs in outputs.items():
        for out in outs:
            assert torch.isfinite(out).all(), name
            # Logits, not probabilities: negative entries, and rows that do not sum to 1.
            assert (out < 0).any(), name
            assert not torch.allclose(out.sum(1), torch.ones(3), atol=1e-3), name
    # The label generator is the one network that returns a distribution (the mask softmax's output).
    assert labels.shape == (3, 100)
    assert torch.allclose(labels.sum(1), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Focal loss


def focal_formula(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """-sum_c t_c (1 - p_c)^gamma log p_c averaged over the batch, from the probabilities, in float64."""
    z = logits.double()
    e = torch.exp(z - z.max(1, keepdim=True).values)
    p = e / e.sum(1, keepdim=True)
    return (-(target.double() * (1 - p) ** gamma * torch.log(p)).sum(1)).mean()


@pytest.fixture(scope="module")
def focal_inputs():
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(6, 7, generator=g, dtype=F64)
    classes = torch.tensor([0, 3, 6, 2, 2, 5])
    soft = torch.softmax(2 * torch.randn(6, 7, generator=g, dtype=F64), dim=1)
    return logits, classes, soft


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_focal_loss_matches_formula(script, focal_inputs):
    module = SCRIPTS[script]
    logits, classes, soft = focal_inputs
    one_hot = F.one_hot(classes, 7).double()
    for target in (one_hot, soft):
        for x in (logits, logits.float()):
            got = module.focal_loss(x, target.to(x.dtype))
            assert got.item() == pytest.approx(focal_formula(logits, target).item(), rel=1e-6)
    # Per-sample terms too: -(1 - p)^2 log p for every class.
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(
        module.focal_terms(logits).double(), -((1 - p) ** 2) * torch.log(p), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_focal_loss_gamma_zero_is_cross_entropy(script, focal_inputs):
    module = SCRIPTS[script]
    logits, classes, soft = focal_inputs
    one_hot = F.one_hot(classes, 7).double()
    ce_hard = F.cross_entropy(logits, classes).item()
    ce_soft = F.cross_entropy(logits, soft).item()
    assert module.focal_loss(logits, one_hot, gamma=0.0).item() == pytest.approx(ce_hard, rel=1e-6)
    assert module.focal_loss(logits, soft, gamma=0.0).item() == pytest.approx(ce_soft, rel=1e-6)
    # and the focal weighting lowers the loss of well-classified samples
    assert module.focal_loss(logits, one_hot).item() < ce_hard


def test_focal_loss_is_the_same_function_in_every_script(focal_inputs):
    logits, _, soft = focal_inputs
    values = {name: module.focal_loss(logits, soft).item() for name, module in SCRIPTS.items()}
    assert values["maxl"] == values["human"] == values["single"]


# ---------------------------------------------------------------------------------------------
# The shared Config fields (the layout: tests/test_layout.py)


DATA_FIELDS = ["dataset", "data_root", "download", "train_fraction", "image_size", "backbone", "stem", "pretrained"]
DATA_FIELDS += ["data_path", "workers"]
RUN_FIELDS = [
    "device",
    "seed",
    "deterministic",
    "amp",
    "compile",
    "channels_last",
    "cuda_graphs",
    "results_dir",
    "run_name",
    "resume",
    "overwrite",
    "limit_batches",
    "tensorboard",
    "smoke",
]


def config_fields(module_or_class) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(getattr(module_or_class, "Config", module_or_class))}


def test_shared_config_fields_are_identical():
    """Every script's data and run settings are RunConfig's (one definition), listed after the experiment's."""
    shared = {f.name: f for f in experiment.fields(experiment.RunConfig)}
    assert list(shared) == DATA_FIELDS + RUN_FIELDS
    for script, module in SCRIPTS.items():
        by_name = config_fields(module)
        for name, ref in shared.items():
            f = by_name[name]
            assert (f.type, f.default, dict(f.metadata)) == (ref.type, ref.default, dict(ref.metadata)), (script, name)
        ordered = [f.name for f in experiment.fields(module.Config)]
        assert ordered[-len(shared) :] == DATA_FIELDS + RUN_FIELDS, script


def test_the_run_name_help_example_is_a_name_the_scripts_give():
    """--run-name's help gives MAXL's default run name as its example: a name a run really gets."""
    (action,) = [a for a in experiment.command_line(maxl.Config, maxl.__doc__)._actions if a.dest == "run_name"]
    example = action.help.split("(e.g. ")[1].rstrip(")")
    assert default_name(maxl, maxl.check_config(maxl.Config())) == example


def test_shared_experiment_defaults_agree():
    """Fields every method has (the paper's schedule and loss) carry the same defaults."""
    for name in ("primary_level", "epochs", "batch_size", "lr", "lr_step", "lr_gamma", "focal_gamma"):
        defaults = {script: config_fields(module)[name].default for script, module in SCRIPTS.items()}
        assert len(set(defaults.values())) == 1, (name, defaults)


# ---------------------------------------------------------------------------------------------
# functional_call evaluates the module


def functional_matches_module(net: nn.Module, args: tuple, train: bool) -> None:
    net = copy.deepcopy(net).train(train)
    params = dict(net.named_parameters())
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    with torch.no_grad():
        functional = functional_call(net, (params, buffers), args)
        direct = net(*args)
    functional = functional if isinstance(functional, tuple) else (functional,)
    direct = direct if isinstance(direct, tuple) else (direct,)
    assert len(functional) == len(direct)
    for a, b in zip(functional, direct):
        assert torch.equal(a, b)
    # In train mode the module updated its running statistics; functional_call updated the clones the same way.
    for name, b in net.named_buffers():
        assert torch.equal(buffers[name], b), name


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_functional_forward_equals_module_forward(nets, train):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    functional_matches_module(nets["maxl"], (x,), train)
    functional_matches_module(nets["generator"], (x, torch.tensor([4, 0, 19])), train)
