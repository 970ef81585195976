"""The training scripts end to end, as a user runs them: results files, resume, interrupts, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FAST, checked, default_name, run_main

import model_vgg_human
import model_vgg_maxl
import model_vgg_single
from create_dataset import make_synthetic_cifar100

SCRIPTS = ["model_vgg_single.py", "model_vgg_human.py", "model_vgg_maxl.py"]
EPOCH_KEYS = {"epoch", "train_primary_loss", "train_primary_acc", "test_primary_loss", "test_primary_acc", "seconds"}
METHOD_KEYS = {
    "model_vgg_single.py": set(),
    "model_vgg_human.py": {"train_aux_loss", "train_aux_acc", "test_aux_loss", "test_aux_acc"},
    "model_vgg_maxl.py": {
        "train_aux_loss",
        "train_cosine",
        "meta_primary_loss_before",
        "meta_primary_acc_before",
        "meta_primary_loss_after",
        "meta_primary_acc_after",
        "aux_classes_used",
    },
}


MODULES = {
    "model_vgg_single.py": model_vgg_single,
    "model_vgg_human.py": model_vgg_human,
    "model_vgg_maxl.py": model_vgg_maxl,
}


def run(script: str, *flags: str):
    """The script's main() in this process: what a command-line run does, without the interpreter start-up."""
    return run_main(MODULES[script], *flags)


def args(data_root: Path, results: Path, *extra: str) -> list[str]:
    return ["--data-root", str(data_root), "--results-dir", str(results), *FAST, *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """md5 of every file below `folder`: to prove nothing was changed."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_refused(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', containing each phrase, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, extra",
    [
        ("model_vgg_single.py", []),
        ("model_vgg_human.py", ["--primary-level", "10", "--aux-level", "20"]),
        ("model_vgg_maxl.py", []),
        ("model_vgg_maxl.py", ["--meta-grad", "finite-difference", "--primary-level", "3", "--psi", "2,3,4"]),
    ],
    ids=["single", "human-10-20", "maxl-second-order", "maxl-finite-difference"],
)
def test_one_epoch_writes_results(data_root, tmp_path, script, extra):
    # One batch (of FAST's 4 images) per pass: what is written does not depend on the size of the epoch.
    result = run(script, *args(data_root, tmp_path, "--epochs", "1", "--limit-batches", "1", *extra))
    assert result.returncode == 0, result.stderr
    assert "epoch   1/1" in result.stdout and "final test primary accuracy" in result.stdout
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = metrics["config"]
    assert config["method"] == script.removeprefix("model_vgg_").removesuffix(".py")
    assert config["torch"] == str(torch.__version__) and config["resolved_device"] == "cpu"
    assert config["seed"] == 0 and config["batch_size"] == 4 and config["epochs"] == 1
    assert config["run_name"] == run_dir.name
    (record,) = metrics["epochs"]
    assert EPOCH_KEYS | METHOD_KEYS[script] <= set(record)
    assert record["epoch"] == 1 and 0 <= record["test_primary_acc"] <= 1
    summary = metrics["summary"]
    assert summary["final_test_primary_acc"] == pytest.approx(100 * record["test_primary_acc"])
    assert summary["epochs_completed"] == 1
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["next_epoch"] == 1 and checkpoint["epochs"] == metrics["epochs"]


def test_default_run_names(tmp_path):
    """A run without --run-name lands in the folder its settings name. One real run (Single: the name is made by
    experiment.run_name for every script), and the names Human and MAXL give the same settings."""
    data_root = make_synthetic_cifar100(tmp_path / "data", n_train=100, n_test=10, seed=0)
    # The paper's batch size (another one is an edited setting, which adds a hash to the name), and no
    # --limit-batches (a debug run says so in its name): 100 images make one batch.
    flags = ("--epochs", "1", "--seed", "3", "--batch-size", "100")
    result = run("model_vgg_single.py", *args(data_root, tmp_path / "results", *flags))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["single-pri20-seed3"]
    assert (tmp_path / "results" / "single-pri20-seed3" / "metrics.json").is_file()
    for module, name in [
        (model_vgg_single, "single-pri20-seed3"),
        (model_vgg_human, "human-pri20-aux100-seed3"),
        (model_vgg_maxl, "maxl-second-order-pri20-aux100-seed3"),
    ]:
        assert default_name(module, checked(module, seed=3, batch_size=100)) == name


def test_smoke_runs_without_data_or_download(tmp_path, monkeypatch):
    """From a folder without data: the smoke run makes its own in a temporary folder and leaves nothing."""
    monkeypatch.chdir(tmp_path)  # in this process (no interpreter start), from that folder
    result = run("model_vgg_single.py", "--smoke")  # every script's --smoke is experiment.Run's
    assert result.returncode == 0, result.stderr
    assert "smoke test passed" in result.stdout
    assert list(tmp_path.iterdir()) == []


# --- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, extra",
    [("model_vgg_maxl.py", []), ("model_vgg_human.py", ["--data-path", "device"])],
    ids=["maxl-loader", "human-device-loader"],
)
def test_resume_repeats_an_uninterrupted_run_exactly(data_root, tmp_path, script, extra):
    common = [*args(data_root, tmp_path, "--limit-batches", "1", *extra)]
    straight = run(script, *common, "--epochs", "2", "--run-name", "straight")
    assert straight.returncode == 0, straight.stderr
    first = run(script, *common, "--epochs", "1", "--run-name", "split")
    assert first.returncode == 0, first.stderr
    resumed = run(script, *common, "--epochs", "2", "--run-name", "split", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    expected = json.loads((tmp_path / "straight" / "metrics.json").read_text())["epochs"]
    got = json.loads((tmp_path / "split" / "metrics.json").read_text())["epochs"]
    assert len(got) == 2
    assert without_seconds(got) == without_seconds(expected)


def test_resume_of_a_finished_run_says_so(data_root, tmp_path):
    common = args(data_root, tmp_path, "--limit-batches", "1", "--epochs", "1", "--run-name", "done")
    assert run("model_vgg_single.py", *common).returncode == 0
    before = snapshot(tmp_path)
    result = run("model_vgg_single.py", *common, "--resume")
    assert result.returncode == 0 and "already finished 1 epoch;" in result.stdout
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    """A one-epoch MAXL run folder, copied afresh for each test that damages it."""
    results = tmp_path_factory.mktemp("finished")
    result = run(
        "model_vgg_maxl.py", *args(data_root, results, "--epochs", "1", "--limit-batches", "1", "--run-name", "r")
    )
    assert result.returncode == 0, result.stderr
    return results


@pytest.fixture
def results(finished_run, tmp_path) -> Path:
    shutil.copytree(finished_run, tmp_path / "results")
    return tmp_path / "results"


def test_existing_results_are_not_overwritten(data_root, results):
    before = snapshot(results)
    result = run("model_vgg_maxl.py", *args(data_root, results, "--epochs", "1", "--run-name", "r"))
    assert_refused(result, "already holds results", "--resume", "--overwrite")
    assert snapshot(results) == before


def test_overwrite_starts_over(data_root, results):
    result = run(
        "model_vgg_maxl.py",
        *args(data_root, results, "--epochs", "1", "--limit-batches", "1", "--run-name", "r", "--overwrite"),
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads((results / "r" / "metrics.json").read_text())["epochs"]) == 1


def test_resume_without_checkpoint_is_refused(data_root, tmp_path):
    result = run("model_vgg_maxl.py", *args(data_root, tmp_path, "--epochs", "2", "--run-name", "none", "--resume"))
    assert_refused(result, "no checkpoint at", "checkpoint.pt")


def test_resume_with_other_settings_is_refused(data_root, results):
    before = snapshot(results)
    result = run(
        "model_vgg_maxl.py",
        *args(data_root, results, "--epochs", "2", "--limit-batches", "1", "--run-name", "r", "--resume", "--psi", "3"),
    )
    assert_refused(result, "checkpoint.pt", "--psi 5", "--psi 3")
    assert snapshot(results) == before


def test_resume_with_other_method_is_refused(data_root, results):
    before = snapshot(results)
    result = run(
        "model_vgg_human.py",
        *args(data_root, results, "--epochs", "2", "--limit-batches", "1", "--run-name", "r", "--resume"),
    )
    assert_refused(result, "is a maxl run")
    assert snapshot(results) == before


def test_resume_from_truncated_checkpoint_is_refused(data_root, results):
    checkpoint = results / "r" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    before = snapshot(results)
    result = run(
        "model_vgg_maxl.py",
        *args(data_root, results, "--epochs", "2", "--limit-batches", "1", "--run-name", "r", "--resume"),
    )
    assert_refused(result, str(checkpoint), "corrupt")
    assert snapshot(results) == before


# --- interrupts and faults --------------------------------------------------------------------


# SIGINT, SIGTERM and SIGHUP to a run: tests/test_interrupts.py.


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    import model_vgg_single as single

    real_focal_loss = single.focal_loss
    calls = {"n": 0}

    def focal_loss_that_blows_up(logits, target, gamma=2.0):
        calls["n"] += 1  # epoch 1 = 2 train + 2 test batches; the 2nd train step of epoch 2 goes NaN
        loss = real_focal_loss(logits, target, gamma)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(single, "focal_loss", focal_loss_that_blows_up)
    with pytest.raises(SystemExit) as exit_info:
        single.main(args(data_root, tmp_path, "--epochs", "3", "--limit-batches", "2", "--run-name", "nan"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite loss at epoch 2, train step 2" in err[0], err
    metrics = json.loads((tmp_path / "nan" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["next_epoch"] == 1


# --- bad input: refused before anything runs --------------------------------------------------


@pytest.mark.parametrize(
    "script, extra, phrases",
    [
        ("model_vgg_human.py", ["--primary-level", "20", "--aux-level", "20"], ["--aux-level 20 must be finer", "100"]),
        ("model_vgg_human.py", ["--primary-level", "10", "--aux-level", "10"], ["must be finer", "20, 100"]),
        ("model_vgg_single.py", ["--epochs", "0"], ["--epochs must be at least 1"]),
        ("model_vgg_human.py", ["--batch-size", "0"], ["--batch-size must be at least 1"]),
        ("model_vgg_maxl.py", ["--psi", "5,5"], ["--psi has 2 entries", "20 classes"]),
        ("model_vgg_maxl.py", ["--primary-level", "3", "--psi", "2,0,1"], ["at least 1 auxiliary class"]),
        ("model_vgg_maxl.py", ["--psi", "five"], ["not an integer"]),
        ("model_vgg_maxl.py", ["--psi", "5", "--aux-level", "100"], ["both set psi", "give one of them"]),
        ("model_vgg_maxl.py", ["--aux-level", "20"], ["--aux-level 20 must be finer", "100"]),
        ("model_vgg_maxl.py", ["--cossim-every", "0"], ["--cossim-every must be at least 1"]),
        ("model_vgg_maxl.py", ["--lr", "0"], ["--lr must be positive"]),
        ("model_vgg_single.py", ["--device", "tpu"], ["--device 'tpu' is not one of"]),
        ("model_vgg_single.py", ["--primary-level", "7"], ["--primary-level: invalid choice: 7"]),
        ("model_vgg_maxl.py", ["--epochs", "many"], ["--epochs: invalid int value: 'many'"]),
    ],
)
def test_impossible_settings_are_refused(data_root, tmp_path, script, extra, phrases):
    result = run(script, *args(data_root, tmp_path / "results", *extra))
    assert_refused(result, *phrases)
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused(data_root, tmp_path, device):
    result = run("model_vgg_maxl.py", *args(data_root, tmp_path / "results"), "--device", device)
    assert_refused(result, f"--device {device}: CUDA is not available")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unknown_cuda_device_is_refused(data_root, tmp_path):
    result = run("model_vgg_maxl.py", *args(data_root, tmp_path / "results"), "--device", "cuda:99")
    assert_refused(result, "cuda:99", "CUDA device(s)")


def test_missing_dataset_with_no_download(tmp_path):
    result = run("model_vgg_single.py", *args(tmp_path / "empty", tmp_path / "results"))
    assert_refused(
        result, "not found or corrupted", str(tmp_path / "empty" / "cifar-100-python"), "without --no-download"
    )


def test_corrupt_dataset_file(data_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    train_file = root / "cifar-100-python" / "train"
    damaged = bytearray(train_file.read_bytes())
    damaged[1000] ^= 0xFF
    train_file.write_bytes(bytes(damaged))
    before = snapshot(root)
    result = run("model_vgg_human.py", *args(root, tmp_path / "results"))
    assert_refused(result, "not found or corrupted")
    assert snapshot(root) == before


def test_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    """A download that fails (here: a closed local port instead of the real URL, so nothing is fetched)."""
    import create_dataset
    import model_vgg_single as single

    monkeypatch.setattr(create_dataset.CIFAR100, "url", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(SystemExit) as exit_info:
        single.main(["--data-root", str(tmp_path / "data"), "--results-dir", str(tmp_path / "r"), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "could not download CIFAR-100" in err[0] and "--data-root" in err[0], err


def test_unwritable_results_dir_is_refused_before_training(data_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("model_vgg_maxl.py", *args(data_root, blocker / "results"))
    assert_refused(result, "cannot write results to", "--results-dir")
    assert blocker.read_text() == "not a folder"
