"""The layout the scripts promise: each model script holds its method and its run loop (main()), and calls the run
machinery in experiment.py, a library that imports no script and calls none; the model code copied between scripts
is marked and identical to its source at any depth (tools/check_copies.py), and the tool itself names what differs
and repairs it."""

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

import create_dataset
import experiment
import model_vgg_single as single
from create_dataset import CIFAR100, TEST_TRANSFORM
from tools import check_copies

EVERY_SCRIPT = sorted(path.stem.removeprefix("model_vgg_") for path in REPO.glob("model_vgg_*.py"))
TRUNK_AND_LOSS = (
    "conv_block",
    "head",
    "init_weights",
    "Trunk",
    "at_least_float32",
    "focal_terms",
    "focal_loss",
    "evaluate",
)
# The first definition that is the method's own, the most lines each script may take (its method and its loop),
# and the line by which a reader reaches that definition (MAOAL's Config holds two tasks' settings).
FIRST_OF_THE_METHOD = {
    "single": ("train_step", 330, 250),
    "human": ("VGG16", 360, 250),
    "maxl": ("mask_softmax", 900, 250),
    "wamal": ("weight_head", 1050, 250),
    "maoal": ("ModuleWeights", 1200, 310),
    "autol": ("TaskBatchNorm2d", 1000, 250),
}
# The calls main() makes, in this order: parse, open the run, load the data, build, resume, the epochs (train,
# evaluate, save), the summary.
THE_LOOP = ("run.parse", "run.open", "run.loaders", "build", "run.resume", "run.epochs", "run.save", "run.finish")


def top_level(path: Path) -> list[tuple[str, ast.stmt]]:
    """(name, statement) of every top-level definition, in order."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            out.append((node.name, node))
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out.append((node.targets[0].id, node))
    return out


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    return modules


# --- the copies --------------------------------------------------------------------------------


def test_every_marked_copy_equals_its_source():
    problems = check_copies.check()
    assert not problems, "\n".join([*problems, f"fix: {check_copies.FIX_COMMAND}"])


@pytest.mark.parametrize("name", [name for name in EVERY_SCRIPT if name != "single"])
def test_every_script_marks_the_trunk_and_the_loss_as_copied_from_single(name):
    defs = check_copies.definitions(REPO / f"model_vgg_{name}.py")
    for definition in TRUNK_AND_LOSS:
        if (name, definition) == ("maoal", "evaluate"):  # its own: the domains task's test batches take their head
            continue
        if (name, definition) in (("autol", "head"), ("autol", "init_weights")):  # the authors' heads and init
            continue
        assert defs[definition].copied_from == "model_vgg_single.py", (name, definition)


def test_what_wamal_takes_from_maxl_is_marked():
    """WAMAL shares MAXL's meta-gradient machinery as marked, identical copies; a definition of MAXL's that WAMAL
    changes is WAMAL's own under its own name. Only the names every script defines (Single's: train_step,
    build, ...) are each script's own."""
    defs = check_copies.definitions(REPO / "model_vgg_wamal.py")
    maxl = check_copies.definitions(REPO / "model_vgg_maxl.py")
    every_script = set(check_copies.definitions(REPO / "model_vgg_single.py"))
    marked = {name for name, d in defs.items() if d.copied_from == "model_vgg_maxl.py"}
    assert {
        "mask_softmax",
        "inner_step",
        "aux_slope",
        "generator_gradients",
        "double_backward",
        "path_tangent",
    } <= marked
    assert {"parse_psi", "resolve_psi", "virtual_step_statistics", "eval_step"} <= marked
    unmarked_namesakes = {
        name for name, d in defs.items() if "." not in name and name in maxl and d.copied_from is None
    }
    assert unmarked_namesakes <= every_script, unmarked_namesakes - every_script
    assert {"wamal_meta_gradients", "wamal_meta_step", "LabelWeightGenerator"} <= set(defs)


# --- the layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EVERY_SCRIPT)
def test_a_script_defines_no_machinery_and_reads_top_to_bottom(name):
    path = REPO / f"model_vgg_{name}.py"
    definitions = top_level(path)
    names = [n for n, _ in definitions]
    machinery = {n for n, _ in top_level(REPO / "experiment.py")}
    assert not (set(names) - {"main"}) & machinery, set(names) & machinery
    # A definition uses only names defined above it (main, at the bottom, gathers them).
    position = {n: i for i, n in enumerate(names)}
    for i, (defined, node) in enumerate(definitions):
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        later = sorted(u for u in used if position.get(u, -1) > i)
        assert not later, f"{path.name}: {defined} uses {later}, defined below it"
    assert names[-1] == "main" and "METHOD" not in names
    first, most_lines, reached_by = FIRST_OF_THE_METHOD[name]
    lines = path.read_text().splitlines()
    assert len(lines) <= most_lines
    assert (
        next(
            i for i, line in enumerate(lines) if line.startswith(f"def {first}(") or line.startswith(f"class {first}(")
        )
        < reached_by
    )


@pytest.mark.parametrize("name", EVERY_SCRIPT)
def test_each_scripts_main_holds_its_loop(name):
    """main() reads top to bottom in about 50 lines: parse, open, data, build, resume, then for each epoch train,
    evaluate, save and print, then the summary; every call a plain function or a method of experiment.Run."""
    module = importlib.import_module(f"model_vgg_{name}")
    main = dict(top_level(REPO / f"model_vgg_{name}.py"))["main"]
    assert main.end_lineno - main.lineno + 1 <= 55
    (with_run,) = [node for node in ast.walk(main) if isinstance(node, ast.With)]
    assert ast.unparse(with_run.items[0].context_expr) == "experiment.Run(argv)"
    in_order = sorted((n for n in ast.walk(main) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    calls = [ast.unparse(node.func) for node in in_order]
    order = [min(i for i, call in enumerate(calls) if call == step) for step in THE_LOOP]
    assert order == sorted(order), dict(zip(THE_LOOP, order))
    (loop,) = [node for node in ast.walk(main) if isinstance(node, ast.For)]
    assert ast.unparse(loop.iter) == "run.epochs()"
    in_loop = {ast.unparse(node.func) for node in ast.walk(loop) if isinstance(node, ast.Call)}
    assert {"train_epoch", "evaluate", "run.save", "run.say", "epoch_line"} <= in_loop
    # Config holds the experiment; the data and run settings are RunConfig's alone.
    own = [f.name for f in experiment.fields(module.Config)]
    shared = [f.name for f in experiment.fields(experiment.RunConfig)]
    assert own[0] == "primary_level" and own[-len(shared) :] == shared
    assert "epochs" in own and "batch_size" in own
    assert not set(module.Config.__annotations__) & set(shared)


def test_the_import_graph_is_one_way_and_experiment_calls_no_script():
    scripts = {f"model_vgg_{name}" for name in EVERY_SCRIPT}
    tools = {"figure3", "tables", "runner"}
    assert not imported_modules(REPO / "experiment.py") & (scripts | tools)
    assert not imported_modules(REPO / "create_dataset.py") & (scripts | tools | {"experiment"})
    for name in scripts:
        imports = imported_modules(REPO / f"{name}.py")
        assert "experiment" in imports and not imports & (scripts - {name}), name
    # Nothing in experiment.py reaches into a script: no Method of callbacks, no module lookups by name, no
    # convention on the names of a script's objects (a state dict's keys).
    text = (REPO / "experiment.py").read_text()
    assert "import_module" not in text and "sys.modules" not in text and "class Method" not in text
    assert not re.search(r"\bmethod\.[a-z_]+\(", text) and "forward_" not in text and '["optimizer"]' not in text
    assert "torch.optim.Optimizer)" not in text and "LRScheduler)" not in text  # no objects found by their type


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


def test_check_names_each_copy_that_differs_and_changes_nothing(repo_copy, capsys):
    edit(
        repo_copy / "model_vgg_maxl.py", '    """Focal loss against a target', '    """The focal loss against a target'
    )
    edit(repo_copy / "model_vgg_wamal.py", "MASK_FLOOR = 1e-8", "MASK_FLOOR = 1e-9")
    before = {p.name: p.read_text() for p in repo_copy.iterdir()}
    assert check_copies.main(["--check", "--repo", str(repo_copy)]) == 1
    capsys.readouterr()
    assert check_copies.main(["--repo", str(repo_copy)]) == 1
    out = capsys.readouterr().out
    assert "model_vgg_maxl.py: focal_loss differs from model_vgg_single.py" in out
    assert "model_vgg_wamal.py: MASK_FLOOR differs from model_vgg_maxl.py" in out
    assert "model_vgg_human.py" not in out and check_copies.FIX_COMMAND in out
    assert {p.name: p.read_text() for p in repo_copy.iterdir()} == before


def test_fix_copies_the_source_into_every_copy_and_says_what_changed(repo_copy, capsys):
    edit(
        repo_copy / "model_vgg_single.py",
        "    return nn.Sequential(nn.Linear(num_features, 512),",
        "    # new\n    return nn.Sequential(nn.Linear(num_features, 512),",
    )
    edit(
        repo_copy / "model_vgg_maxl.py",
        "        super().__init__()\n        if backbone is None:",
        "        super().__init__()  # drift\n        if backbone is None:",
    )
    maxl_before = (repo_copy / "model_vgg_maxl.py").read_text()
    assert check_copies.main(["--fix", "--repo", str(repo_copy)]) == 0
    out = capsys.readouterr().out
    assert "model_vgg_maxl.py: rewrote head, Trunk" in out and "model_vgg_human.py: rewrote head" in out
    assert check_copies.check(repo_copy) == []
    fixed = (repo_copy / "model_vgg_maxl.py").read_text()
    assert "    # new\n" in fixed and "# drift" not in fixed
    # Nothing else of the script changed.
    assert fixed.replace("    # new\n", "", 1) == maxl_before.replace(
        "super().__init__()  # drift\n", "super().__init__()\n"
    )
    assert check_copies.main(["--fix", "--repo", str(repo_copy)]) == 0
    assert "every copy already equals its source" in capsys.readouterr().out


@pytest.mark.parametrize(
    "mark, message",
    [
        ("# Copied from model_vgg_nowhere.py", "which is not a model script"),
        ("# Copied from model_vgg_human.py", "where it is a copy from model_vgg_single.py: mark it with that one"),
    ],
)
def test_a_mark_that_cannot_be_followed_is_refused(repo_copy, capsys, mark, message):
    edit(repo_copy / "model_vgg_maxl.py", "# Copied from model_vgg_single.py\ndef head(", f"{mark}\ndef head(")
    assert check_copies.main(["--repo", str(repo_copy)]) == 2
    assert message in capsys.readouterr().err


def test_a_mark_on_a_name_the_source_lacks_is_refused(repo_copy, capsys):
    edit(
        repo_copy / "model_vgg_maxl.py",
        "\ndef negative_entropy(",
        "\n# Copied from model_vgg_single.py\ndef negative_entropy(",
    )
    assert check_copies.main(["--repo", str(repo_copy)]) == 2
    assert "model_vgg_single.py, which defines no negative_entropy" in capsys.readouterr().err


def test_a_mark_inside_a_body_is_refused(repo_copy, capsys):
    inside = "\n        features = self.features(x)\n"  # a statement in VGG16.forward
    edit(repo_copy / "model_vgg_maxl.py", inside, "\n        # Copied from model_vgg_single.py" + inside)
    assert check_copies.main(["--repo", str(repo_copy)]) == 2
    assert "the mark is not on the line above a definition" in capsys.readouterr().err


def test_a_copy_at_any_depth_is_checked_and_fixed_at_its_own_depth(tmp_path):
    """A method marked as copied is compared with the definition of the same qualified name in its source."""
    (tmp_path / "model_vgg_a.py").write_text("class Net:\n    def step(self):\n        return 1\n")
    copy = "class Net:\n    # Copied from model_vgg_a.py\n    def step(self):\n        return 2\n\n    def own(self):\n"
    copy += "        pass\n"
    (tmp_path / "model_vgg_b.py").write_text(copy)
    assert check_copies.check(tmp_path) == ["model_vgg_b.py: Net.step differs from model_vgg_a.py"]
    assert check_copies.main(["--fix", "--repo", str(tmp_path)]) == 0
    assert (tmp_path / "model_vgg_b.py").read_text() == copy.replace("return 2", "return 1")
    assert check_copies.check(tmp_path) == []


# --- the data a script hands its loaders -----------------------------------------------------------


def test_a_held_out_developing_set_is_removed_from_training_and_loaded_apart(data_root):
    """A script's developing set (train_set.split): no held-out image is trained on; the dev loader has them all,
    unaugmented."""
    held = np.arange(0, 200, 10)
    for data_path in ("loader", "device"):
        cfg = single.check_config(
            single.Config(data_root=str(data_root), download=False, device="cpu", workers=0, batch_size=30)
        )
        cfg = dataclasses.replace(cfg, data_path=data_path)
        train_set, test_set = create_dataset.load_datasets(cfg)
        train_set, dev_set = train_set.split(held, held_out_transform=test_set.transform)
        loaders = create_dataset.make_loaders(cfg, torch.device("cpu"), train_set, test_set, dev_set)
        train = torch.cat([images for images, _ in loaders.train])
        dev_images = torch.cat([images for images, _ in loaders.dev])
        assert len(train) == 180 and len(dev_images) == 20
        reference = CIFAR100(data_root, train=True, transform=TEST_TRANSFORM)
        expected = torch.stack([reference[i][0] for i in held])
        # The dev batches are shuffled but not augmented: the same images as the test transform gives.
        order = [int(torch.argmin((expected - image).abs().flatten(1).sum(1))) for image in dev_images]
        assert sorted(order) == list(range(20))
        torch.testing.assert_close(dev_images, expected[order])
    assert create_dataset.make_loaders(cfg, torch.device("cpu"), *create_dataset.load_datasets(cfg)).dev is None
