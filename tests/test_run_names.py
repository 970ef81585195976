"""Default run names: the paper's configuration keeps its readable name; settings that change the result
and differ from the paper's add a short, stable hash; settings that cannot change the result never do."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
from conftest import REPO, default_name

import experiment
import model_vgg_human as human
import model_vgg_maxl as maxl
import model_vgg_single as single

SCRIPTS = {"single": single, "human": human, "maxl": maxl}
PAPER_NAMES = {
    "single": "single-pri20-seed0",
    "human": "human-pri20-aux100-seed0",
    "maxl": "maxl-second-order-pri20-aux100-seed0",
}
# Settings that only change how or where a run executes: never in a run name.
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
# A value other than the paper's for each setting that changes the result.
EDITS = {
    "batch_size": 50,
    "lr": 0.02,
    "lr_step": 40,
    "lr_gamma": 0.1,
    "focal_gamma": 0.0,
    "gen_lr": 1e-4,
    "gen_weight_decay": 0.0,
    "entropy_weight": 0.4,
    "cossim_every": 1,
    "amp": True,
    "psi": [4, 6] * 10,
    "seed": 1,
    "primary_level": 10,
    "aux_level": 20,
    "meta_grad": "double-backward",
    "fd_step": 0.001,
    "aux_weight": 2.0,
}


# The data and network settings: a value other than the paper's for each, and what it needs beside it.
DATA_EDITS = {"dataset": "cifar10", "backbone": "resnet18", "stem": "imagenet", "pretrained": True}
DATA_EDITS |= {"image_size": 64, "train_fraction": 0.5}
DATA_BASE = {"stem": {"backbone": "resnet18"}, "pretrained": {"backbone": "resnet18"}}


def accepts(module, field: str) -> bool:
    """Whether the method takes a value of this data or network setting other than the paper's."""
    if field == "dataset":
        return not getattr(module, "CIFAR100_ONLY", "")
    if field in ("backbone", "stem", "pretrained"):
        try:
            module.check_config(module.Config(backbone="resnet18"))
        except experiment.UsageError:
            return False
    return True


def name(module, **changes) -> str:
    return default_name(module, module.check_config(module.Config(**changes)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_papers_configuration_keeps_its_readable_name(script):
    assert name(SCRIPTS[script]) == PAPER_NAMES[script]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_setting_is_in_the_name_or_never_changes_it(script):
    """Each field either never enters the name (RUN_ONLY) or, changed alone, gives a new name."""
    module = SCRIPTS[script]
    for field in experiment.fields(module.Config):
        if field.name in RUN_ONLY or not accepts(module, field.name):
            continue
        assert field.name in EDITS | DATA_EDITS, f"{script}: no test value for {field.name}"
        base = {"primary_level": 3} if field.name == "aux_level" else {}  # at 20 only 100 is finer
        base |= {"meta_grad": "finite-difference"} if field.name == "fd_step" else {}  # fd_step is used there only
        base |= DATA_BASE.get(field.name, {})
        changed = name(module, **base, **{field.name: (EDITS | DATA_EDITS)[field.name]})
        assert changed != name(module, **base), (script, field.name)


@pytest.mark.parametrize("script", SCRIPTS)
def test_settings_that_cannot_change_the_result_never_change_the_name(script):
    module = SCRIPTS[script]
    changes = dict(epochs=3, workers=0, data_root="elsewhere", download=False, cuda_graphs=False, device="cpu")
    changes |= dict(deterministic=True, compile=True, channels_last=False, data_path="loader", results_dir="r")
    changes |= dict(resume=True, overwrite=True, smoke=True)
    assert name(module, **changes) == PAPER_NAMES[script]


def test_edited_settings_add_a_stable_hash():
    edited = name(maxl, lr=0.02)
    assert re.fullmatch(r"maxl-second-order-pri20-aux100-seed0-[0-9a-f]{8}", edited)
    assert name(maxl, lr=0.02) == edited  # the same edit finds the same folder again
    assert name(maxl, lr=0.03) != edited
    assert name(maxl, lr=0.02, gen_lr=1e-4) not in (edited, name(maxl, gen_lr=1e-4))
    # The hash is of the edited settings' values: known value, so it stays the same across versions.
    cfg = maxl.check_config(maxl.Config(lr=0.02))
    assert experiment.edited_settings(cfg, maxl.paper_settings(cfg)) == {"lr": 0.02}


def test_psi_is_compared_as_the_parsed_list():
    assert name(maxl, psi="5") == name(maxl, psi=[5] * 20) == name(maxl, psi=",".join(["5"] * 20))
    assert name(maxl, psi=[5] * 20) == PAPER_NAMES["maxl"]
    same_sum = name(maxl, psi=[4, 6] * 10)
    assert same_sum.startswith("maxl-second-order-pri20-aux100-seed0-") and same_sum != PAPER_NAMES["maxl"]


def test_fd_step_enters_the_name_only_where_it_is_used():
    with pytest.raises(experiment.UsageError, match="fd_step = 0.001 in Config is used with --meta-grad finite-diff"):
        name(maxl, fd_step=0.001)  # the exact meta-gradients take no step: refused, not silently recorded
    fd = name(maxl, meta_grad="finite-difference")
    assert fd == "maxl-finite-difference-pri20-aux100-seed0"
    assert name(maxl, meta_grad="finite-difference", fd_step=0.001) != fd


def test_a_default_edited_in_the_file_gives_a_new_name(tmp_path):
    """The name compares with the paper's values, not with Config's defaults: editing the file is an edit too."""
    source = (REPO / "model_vgg_maxl.py").read_text()
    edited = source.replace("entropy_weight: float = option(0.2,", "entropy_weight: float = option(0.4,", 1)
    assert edited != source
    path = tmp_path / "model_vgg_maxl_edited.py"
    path.write_text(edited)
    spec = importlib.util.spec_from_file_location("model_vgg_maxl_edited", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks the module up while building Config
    try:
        spec.loader.exec_module(module)
        assert default_name(module, module.check_config(module.Config())) == name(maxl, entropy_weight=0.4)
    finally:
        del sys.modules[spec.name]


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_defaults_are_the_papers_settings(script):
    """The defaults in the file are the paper's record (a user who edits them gets new run names, as above)."""
    module = SCRIPTS[script]
    cfg = module.check_config(module.Config())
    for key, value in module.paper_settings(cfg).items():
        assert getattr(cfg, key) == value, key
