"""The speed benchmark runs end to end on CPU, and its reference-style steps compute what the scripts compute."""

from __future__ import annotations

import json
import math
import re

import conftest  # noqa: F401  (puts the repository root on sys.path)
import pytest
import torch

from benchmarks import speed

ROWS = ("single", "maxl-second-order", speed.REFERENCE_STYLE, "wamal-second-order", "maoal")


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread: on a small machine shared with other jobs, OpenMP's two threads can be 10x slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocess
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_benchmark_runs_and_prints_the_table(tmp_path, one_thread, capsys):
    """Every kind of row at batch 2, one timed iteration: ours, the reference's way, the successors."""
    out_json = tmp_path / "speed.json"
    methods = ("single", "maxl-second-order", "wamal-second-order", "maoal")
    flags = ("--batch-size", "2", "--warmup", "0", "--iters", "1", "--device", "cpu", "--reference-style")
    speed.main(["--methods", *methods, *flags, "--json", str(out_json)])
    stdout = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line for line in stdout.splitlines() if line.startswith(ROWS)}
    assert set(ROWS) <= set(lines), stdout
    for name in ROWS:
        numbers = [float(v) for v in re.findall(r"(?<![\w(-])\d+(?:\.\d+)?", lines[name].removeprefix(name))]
        assert len(numbers) >= 8 and all(v > 0 for v in numbers), lines[name]
    assert "maxl-second-order / reference-style on cpu: time" in stdout
    rows = {row["method"]: row for row in json.loads(out_json.read_text())["devices"][0]["rows"]}
    assert set(rows) == {*methods, speed.REFERENCE_STYLE}
    for name, row in rows.items():
        for key in ("ms_median", "ms_min", "images_per_s", "hours_200_epochs", "tflop_per_iter"):
            assert row[key] > 0, (name, key)
    # The reference's way does strictly more work than ours.
    assert rows[speed.REFERENCE_STYLE]["tflop_per_iter"] > rows["maxl-second-order"]["tflop_per_iter"]
    # The successors: WAMAL's two phases; MAOAL's train step plus its meta step at a 1/--meta-every share.
    for name in ("wamal-second-order", "maoal"):
        assert set(rows[name]["phase_ms_median"]) == {"phase 1", "phase 2"}
    maoal = rows["maoal"]
    phase1, phase2 = maoal["phase_ms_median"]["phase 1"], maoal["phase_ms_median"]["phase 2"]
    assert maoal["ms_median"] == pytest.approx(phase1 + phase2 / 20, rel=1e-6)  # the meta step every 20 batches


def test_benchmark_runs_on_another_backbone(tmp_path, one_thread, capsys):
    """Rows per backbone (here resnet18, batch 2, one timed iteration): named method/backbone, resolved as a run
    resolves --backbone (CIFAR stem at 32x32), finite numbers; maoal, VGG-16 only in its hierarchy task, skipped
    with its script's reason."""
    out_json = tmp_path / "speed.json"
    flags = ("--batch-size", "2", "--warmup", "0", "--iters", "1", "--device", "cpu", "--backbones", "resnet18")
    speed.main(["--methods", "single", "maxl-second-order", "maoal", *flags, "--json", str(out_json)])
    stdout = capsys.readouterr().out
    names = ("single/resnet18", "maxl-second-order/resnet18")
    lines = {line.split("  ")[0].strip(): line for line in stdout.splitlines() if line.startswith(names)}
    assert set(names) <= set(lines), stdout
    for name in names:
        numbers = [float(v) for v in re.findall(r"(?<![\w(-])\d+(?:\.\d+)?", lines[name].removeprefix(name))]
        assert len(numbers) >= 8 and all(v > 0 for v in numbers), lines[name]
    note = "maoal/resnet18 skipped: model_vgg_maoal.py refuses --backbone resnet18: the hierarchy task's lambda"
    assert note in stdout
    assert "resnet18 (image size 32, cifar stem)" in stdout
    document = json.loads(out_json.read_text())["devices"][0]
    rows = {row["method"]: row for row in document["rows"]}
    assert set(rows) == set(names)
    (skipped,) = document["skipped"]
    assert skipped.startswith(note) and skipped.endswith("--task domains")
    for name, row in rows.items():
        assert (row["backbone"], row["stem"], row["image_size"]) == ("resnet18", "cifar", 32)
        for key in ("ms_median", "ms_min", "ms_epoch_mean", "images_per_s", "tflop_per_iter", "peak_mib"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (name, key)
    assert set(rows["maxl-second-order/resnet18"]["phase_ms_median"]) == {"phase 1", "phase 2"}
    # ResNet-18 with the CIFAR stem (not the ImageNet stem's 16x fewer pixels): 0.56 GMAC = 1.1 GFLOP per 32x32
    # image forward, forward and backward about 3x that.
    assert 2 * 2.5e-3 < rows["single/resnet18"]["tflop_per_iter"] < 2 * 4.5e-3


def test_backbones_flag_and_row_order(capsys):
    """--backbones takes commas or spaces; rows grouped by backbone; reference-style stays VGG-16's."""
    args = speed.parse_args(["--methods", "single", "maoal", "--backbones", "resnet18,vit_b_16", "vgg16"])
    assert args.backbones == ["resnet18", "vit_b_16", "vgg16"]
    methods, skipped = speed.method_list(args)
    assert [m.name for m in methods] == ["single/resnet18", "single/vit_b_16", "single", "maoal"]
    assert [m.backbone for m in methods] == ["resnet18", "vit_b_16", "vgg16", "vgg16"]
    assert len(skipped) == 2 and skipped[0].startswith("maoal/resnet18 skipped")
    assert [m.name for m in speed.method_list(speed.parse_args([]))[0]] == list(speed.DEFAULT_METHODS)
    args = speed.parse_args(["--methods", "single", "--backbones", "resnet50", "--reference-style"])
    names = [m.name for m in speed.method_list(args)[0]]
    assert names == ["maxl-second-order", speed.REFERENCE_STYLE, "single/resnet50"]
    assert "VGG-16 only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        speed.parse_args(["--backbones", "vgg19"])


def small_maxl_state(batch_size: int = 4):
    method = speed.method_spec(speed.REFERENCE_STYLE)
    module = speed.script(method)
    args = speed.parse_args(["--batch-size", str(batch_size), "--device", "cpu"])
    cfg = speed.make_config(method, torch.device("cpu"), args)
    torch.manual_seed(0)
    state = module.build(cfg, torch.device("cpu"))
    images, labels = speed.random_batch(batch_size, torch.device("cpu"), channels_last=False)
    return module, cfg, state, images, labels


@pytest.mark.parametrize("step", ["phase 1", "phase 2"])
def test_reference_style_matches_the_script(step, one_thread):
    """Phase 1: the same theta_1 update as train_step; phase 2: meta_gradients' double-backward gradient."""
    module, cfg, state, images, labels = small_maxl_state()
    if step == "phase 1":
        twin = module.build(cfg, torch.device("cpu"))
        twin["model"].load_state_dict(state["model"].state_dict())
        twin["label_generator"].load_state_dict(state["label_generator"].state_dict())
        module.train_step(twin, images, labels, cfg, diagnose=True)
        speed.reference_train_step(module, state, images, labels, cfg)
        for (name, p), q in zip(state["model"].named_parameters(), twin["model"].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        assert all(p.grad is None for p in state["label_generator"].parameters())
        return
    primary = speed.primary_labels(labels, cfg)
    inner_lr = state["optimizer"].param_groups[0]["lr"]
    expected, _ = module.meta_gradients(
        model=state["model"],
        label_generator=state["label_generator"],
        images=images,
        primary=primary,
        inner_lr=inner_lr,
        method="double-backward",
        entropy_weight=cfg.entropy_weight,
    )
    got = speed.reference_meta_gradients(module, state, images, labels, cfg)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-7)


def test_a_name_missing_from_a_script_is_one_clear_line(monkeypatch, capsys):
    import model_vgg_maxl

    monkeypatch.delattr(model_vgg_maxl, "meta_step")
    with pytest.raises(SystemExit) as exit_info:
        speed.script(speed.method_spec("maxl-second-order"))
    message = str(exit_info.value.code)
    assert message.startswith("error: benchmarks/speed.py uses meta_step from model_vgg_maxl.py")
    assert "SCRIPT_NAMES" in message and "\n" not in message
    import model_vgg_wamal

    monkeypatch.delattr(model_vgg_wamal, "wamal_meta_step")
    with pytest.raises(SystemExit) as exit_info:
        speed.script(speed.method_spec("wamal-second-order"))
    message = str(exit_info.value.code)
    assert message.startswith("error: benchmarks/speed.py uses wamal_meta_step from model_vgg_wamal.py")
    assert "SCRIPT_NAMES" in message and "\n" not in message


def test_script_names_are_what_the_scripts_define():
    for module_name, names in speed.SCRIPT_NAMES.items():
        module = __import__(module_name)
        assert all(hasattr(module, name) for name in names), module_name
