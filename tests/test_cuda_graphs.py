"""StepGraphs: replaying the steps as CUDA graphs trains exactly as running them eagerly.

The replay runs the kernels the capture recorded on the same parameters, so with deterministic
kernels a graphed run must match an eager run to rounding. These tests need CUDA; off CUDA the
scripts never build a graph (the disabled path is the eager step itself, tested on CPU below).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_script

import experiment
import model_vgg_maxl as maxl

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_disabled_off_cuda_calls_the_step_itself():
    graphs = experiment.StepGraphs([], torch.device("cpu"), enabled=True)
    assert not graphs.enabled
    images, labels = torch.randn(2, 3, 32, 32), torch.zeros(2, 4, dtype=torch.long)
    out = graphs("train", lambda x, y: {"sum": x.sum() + y.sum()}, images, labels)
    assert out["sum"] == images.sum()
    assert not graphs.graphs and not graphs.calls


def cuda_run(script: str, data_root: Path, results: Path, name: str, *extra: str) -> tuple[list[dict], dict]:
    flags = ["--data-root", str(data_root), "--results-dir", str(results), "--no-download", "--device", "cuda"]
    flags += ["--batch-size", "20", "--run-name", name, "--deterministic", *extra]
    result = run_script(script, *flags)
    assert result.returncode == 0, result.stderr
    history = json.loads((results / name / "metrics.json").read_text())["epochs"]
    checkpoint = torch.load(results / name / "checkpoint.pt", map_location="cpu", weights_only=False)
    return history, checkpoint


RUNS = {
    "single": ("model_vgg_single.py", []),
    "human": ("model_vgg_human.py", []),
    **{
        method: ("model_vgg_maxl.py", ["--cossim-every", "3", "--meta-grad", method])
        for method in maxl.META_GRADIENT_METHODS
    },
    # The DataLoader path: its pin-memory thread allocates pinned memory while a step is being captured.
    "maxl-dataloader": ("model_vgg_maxl.py", ["--cossim-every", "3", "--data-path", "loader", "--workers", "2"]),
    "wamal": ("model_vgg_wamal.py", ["--cossim-every", "3"]),
    # lambda changes between replays of the graphed step (every 3 steps): the graph must read it, not copy it.
    **{
        f"maoal-{mode}": ("model_vgg_maoal.py", ["--mode", mode, "--dev-size", "20", "--meta-every", "3"])
        for mode in ("maoal", "gcs")
    },
}


@needs_cuda
@pytest.mark.parametrize(("script", "flags"), RUNS.values(), ids=RUNS.keys())
def test_graphed_run_matches_eager_run(script, flags, data_root, tmp_path):
    """3 epochs of 10 batches: every step is warmed up, captured and replayed; the learning rate changes
    every epoch (--lr-step 1), so graphs are dropped and captured again."""
    extra = ["--epochs", "3", "--lr-step", "1", *flags]
    eager, eager_state = cuda_run(script, data_root, tmp_path, "eager", "--no-cuda-graphs", *extra)
    graphed, graphed_state = cuda_run(script, data_root, tmp_path, "graphed", "--cuda-graphs", *extra)
    for e, g in zip(eager, graphed, strict=True):
        for key, value in e.items():
            if key != "seconds":
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (e["epoch"], key)
    for key in ("model", "label_generator", "module_weights"):
        if key in eager_state:
            for name, value in eager_state[key].items():
                torch.testing.assert_close(graphed_state[key][name], value, rtol=1e-4, atol=1e-6, msg=name)


@needs_cuda
def test_graphs_replay_after_warm_up_and_are_dropped_when_the_learning_rate_changes():
    device = torch.device("cuda")
    weight = torch.ones(3, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = (weight * images.mean(0)).sum()
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    graphs = experiment.StepGraphs([optimizer], device)
    images = torch.ones(2, 3, device=device)
    labels = torch.zeros(2, 4, dtype=torch.long, device=device)
    for call in range(6):
        out = graphs("step", step, images * (call + 1), labels)
        expected = 3 * (call + 1) * (1 - 0.1 * call * (call + 1) / 2)  # weight after `call` SGD steps
        assert float(out["loss"]) == pytest.approx(expected, abs=1e-5)
        assert (("step", (2, 3), (2, 4)) in graphs.graphs) == (call >= graphs.WARMUP)
    optimizer.param_groups[0]["lr"] = 0.05
    graphs("step", step, images, labels)
    assert not graphs.graphs  # a learning rate changed: the capture with lr 0.1 is gone
