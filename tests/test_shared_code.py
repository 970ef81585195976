"""The code every model script repeats: identical to the canonical copy (tools/sync_shared.py), laid out as
the scripts promise (the method first, then one banner and the whole run machinery), and the tool itself
(its check names what differs, its sync repairs it); run names of edited settings."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

import model_vgg_human as human
import model_vgg_maxl as maxl
import model_vgg_single as single
from create_dataset import CIFAR100, TEST_TRANSFORM
from tools import sync_shared

SCRIPTS = {"single": single, "human": human, "maxl": maxl}
EVERY_SCRIPT = sorted(path.stem.removeprefix("model_vgg_") for path in REPO.glob("model_vgg_*.py"))


def test_every_model_script_shares_the_canonical_code():
    problems = sync_shared.check()
    assert not problems, "\n".join([*problems, f"fix: {sync_shared.SYNC_COMMAND}"])


def test_the_check_covers_every_model_script():
    scripts = sorted(p.name for p in REPO.glob("model_vgg_*.py"))
    assert {"model_vgg_single.py", "model_vgg_human.py", "model_vgg_maxl.py"} <= set(scripts)
    for name in scripts:
        pieces = sync_shared.pieces(REPO / name)
        assert {"machinery", "Config fields", *sync_shared.SHARED_DEFINITIONS} == set(pieces)


# --- layout ------------------------------------------------------------------------------------


def banner_names(text: str) -> list[str]:
    """The names the banner says the machinery needs from the method part."""
    banner = text[text.index(sync_shared.BANNER) : text.index("# It provides")]
    return re.findall(r"^#   (\w+)", banner, flags=re.MULTILINE)


@pytest.mark.parametrize("name", EVERY_SCRIPT)
def test_method_first_then_one_banner_then_the_machinery(name):
    path = REPO / f"model_vgg_{name}.py"
    text = path.read_text()
    assert text.count(sync_shared.BANNER) == 1
    tree = ast.parse(text)
    banner_line = text[: text.index(sync_shared.BANNER)].count("\n") + 1
    above = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.lineno < banner_line}
    below = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.lineno > banner_line}
    needed = banner_names(text)
    assert needed[:2] == ["METHOD", "Config"] and len(needed) >= 10
    for needed_name in needed:
        assert needed_name in above or needed_name == "METHOD", (name, needed_name)
    assert "METHOD" in text[: text.index(sync_shared.BANNER)]
    # The machinery is below the banner, and nothing of the method is.
    assert {"run", "smoke", "main", "parse_config", "StepGraphs", "Meter", "load_checkpoint"} <= below
    assert not {"train_step", "train_epoch", "eval_step", "build", "epoch_line", "check_config"} & below
    # Reading order of the method part: Config, networks, losses, steps, epoch, build, the epoch line.
    order = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in above]
    for first, then in [("Config", "VGGTrunk"), ("VGGTrunk", "focal_loss"), ("focal_loss", "train_step")]:
        assert order.index(first) < order.index(then), (first, then)
    assert order.index("train_step") < order.index("train_epoch") < order.index("build") < order.index("epoch_line")


def test_config_has_the_experiment_first_then_the_shared_fields():
    for module in map(importlib.import_module, (f"model_vgg_{name}" for name in EVERY_SCRIPT)):
        names = [f.name for f in dataclasses.fields(module.Config)]
        assert names[0] == "primary_level" and names.index("epochs") < names.index("data_root")


# --- the tool ----------------------------------------------------------------------------------


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    for path in REPO.glob("model_vgg_*.py"):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_check_names_each_script_and_definition_that_differs(repo_copy, capsys):
    edit(repo_copy / "model_vgg_human.py", "def resume_command(run_name: str) -> str:", "def resume_command(run_name):")
    edit(
        repo_copy / "model_vgg_maxl.py", '    """Focal loss against a target', '    """The focal loss against a target'
    )
    edit(repo_copy / "model_vgg_maxl.py", "    seed: int = option(0,", "    seed: int = option(1,")
    before = {p.name: p.read_text() for p in repo_copy.iterdir()}
    assert sync_shared.main(["--check", "--repo", str(repo_copy)]) == 1
    out = capsys.readouterr().out
    assert "model_vgg_human.py: machinery: resume_command differs from model_vgg_single.py" in out
    assert "model_vgg_maxl.py: focal_loss differs" in out and "model_vgg_maxl.py: Config fields differs" in out
    assert "model_vgg_human.py: focal_loss" not in out
    assert "python tools/sync_shared.py" in out
    assert {p.name: p.read_text() for p in repo_copy.iterdir()} == before  # --check changes nothing


def test_sync_copies_the_canonical_code_and_says_what_changed(repo_copy, capsys):
    canonical = repo_copy / "model_vgg_single.py"
    edit(
        canonical, "def write_json(path: Path, obj) -> None:\n", "def write_json(path: Path, obj) -> None:\n    # new\n"
    )
    edit(canonical, '    """A Config field that becomes', '    """A Config field (new) that becomes')
    edit(
        repo_copy / "model_vgg_maxl.py",
        "    def __init__(self):\n        super().__init__()\n        self.block1",
        "    def __init__(self):\n        super().__init__()  # drift\n        self.block1",
    )
    method_part = (repo_copy / "model_vgg_maxl.py").read_text().split(sync_shared.BANNER)[0]
    assert sync_shared.main(["--repo", str(repo_copy)]) == 0
    out = capsys.readouterr().out
    assert "model_vgg_maxl.py: updated option, VGGTrunk, machinery" in out
    assert "model_vgg_human.py: updated option, machinery" in out
    assert sync_shared.check(repo_copy) == []
    synced = (repo_copy / "model_vgg_maxl.py").read_text()
    assert "    # new\n" in synced and "(new)" in synced and "# drift" not in synced
    # Everything else of the method stays as it was.
    assert (
        synced.split(sync_shared.BANNER)[0]
        .replace("A Config field (new) that", "A Config field that")
        .replace("super().__init__()\n        self.block1", "super().__init__()  # drift\n        self.block1")
        == method_part
    )
    assert sync_shared.main(["--repo", str(repo_copy)]) == 0
    assert "already in sync" in capsys.readouterr().out


def test_check_names_an_import_the_shared_code_needs(repo_copy, capsys):
    edit(repo_copy / "model_vgg_human.py", "import hashlib\n", "")
    assert sync_shared.main(["--check", "--repo", str(repo_copy)]) == 1
    assert "model_vgg_human.py: lacks `import hashlib`" in capsys.readouterr().out


def test_a_script_without_the_banner_is_reported(repo_copy, capsys):
    path = repo_copy / "model_vgg_human.py"
    path.write_text(path.read_text().replace(sync_shared.BANNER, "# run machinery"))
    assert sync_shared.main(["--check", "--repo", str(repo_copy)]) == 1
    assert "model_vgg_human.py: no '# RUN MACHINERY.' banner" in capsys.readouterr().out


def test_a_held_out_developing_set_is_removed_from_training_and_loaded_apart(data_root, monkeypatch):
    """The machinery's held_out hook: no held-out image is trained on; the dev loader has them all, unaugmented."""
    held = np.arange(0, 200, 10)
    monkeypatch.setattr(single, "held_out", lambda train_set, cfg: held)
    for data_path in ("loader", "device"):
        cfg = single.check_config(
            single.Config(data_root=str(data_root), download=False, device="cpu", workers=0, batch_size=30)
        )
        cfg = dataclasses.replace(cfg, data_path=data_path)
        loaders = single.make_loaders(cfg, torch.device("cpu"))
        train = torch.cat([images for images, _ in loaders.train])
        dev_images = torch.cat([images for images, _ in loaders.dev])
        assert len(train) == 180 and len(dev_images) == 20
        reference = CIFAR100(data_root, train=True, transform=TEST_TRANSFORM)
        expected = torch.stack([reference[i][0] for i in held])
        # The dev batches are shuffled but not augmented: the same images as the test transform gives.
        order = [int(torch.argmin((expected - image).abs().flatten(1).sum(1))) for image in dev_images]
        assert sorted(order) == list(range(20))
        torch.testing.assert_close(dev_images, expected[order])
    monkeypatch.undo()
    assert single.make_loaders(cfg, torch.device("cpu")).dev is None
