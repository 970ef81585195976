"""The fixed cost of a MAXL run, launch to the first iteration plus the end: ours and the reference's way.

Each measurement is a fresh process on the CPU, one epoch of N batches of 100 (--batch-size) on a synthetic
CIFAR-100 of the real size (50,000 + 10,000 images in the archive's format, written once into --data-root if it
holds none):
  ours         python model_vgg_maxl.py --limit-batches N ...   (metrics and a 120 MB checkpoint written and
               fsync'd); with --workers 0, as the reference, and with the default workers
  reference    a process shaped as the authors' script: the same imports, datasets and networks, then N
               phase-1 batches, N phase-2 batches and N test batches done their way (benchmarks/speed.py's
               reference_train_step and reference_meta_step), a print; nothing saved.
The fixed cost, two ways, each from the median of --repeats runs:
  intercept       with N = 3 and N = 10 batches: per batch = (T10 - T3) / 7, fixed = T3 - 3 x per batch, so it
                  holds everything that does not grow with N: launch to the first finished batch, and the end;
  wall - epoch    at N = 3, the process's wall time minus its epoch's (ours: the epoch's "seconds" in
                  metrics.json, which stops before the checkpoint is written; the reference: its own loop,
                  timed in the process), so the first batches' warm-up counts as epoch time.
Then our fixed cost piece by piece, measured in one process.

    python benchmarks/startup.py --data-root /tmp/cifar-full            # about 25 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BATCHES = (3, 10)


def ours(
    data_root: Path, batches: int, workers: str | None, repo: Path = REPO, batch_size: int = 100
) -> tuple[float, float]:
    """(wall seconds, epoch seconds) of one run of our script (in `repo`: another checkout, e.g. an older commit)."""
    with_workers = [] if workers is None else ["--workers", workers]
    with tempfile.TemporaryDirectory(prefix="startup-") as results:
        command = [
            *(sys.executable, str(repo / "model_vgg_maxl.py"), "--data-root", str(data_root), "--no-download"),
            *("--device", "cpu", "--epochs", "1", "--limit-batches", str(batches), "--results-dir", results),
            *("--batch-size", str(batch_size)),
            *with_workers,
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=repo)
        wall = time.perf_counter() - started
        (metrics,) = Path(results).glob("*/metrics.json")
        return wall, json.loads(metrics.read_text())["epochs"][0]["seconds"]


def reference(data_root: Path, batches: int, batch_size: int = 100) -> tuple[float, float]:
    """(wall seconds, loop seconds) of one reference-style process."""
    command = [sys.executable, __file__, "--reference-process", str(batches), "--data-root", str(data_root)]
    command += ["--batch-size", str(batch_size)]
    started = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return time.perf_counter() - started, float(out.split("loop seconds ")[1])


def reference_process(n: int, data_root: Path, batch_size: int = 100) -> None:
    """The reference's way, as one process: imports, data, networks, N batches of each phase, N test batches."""
    import torch

    import model_vgg_maxl as module
    from benchmarks import speed
    from create_dataset import CIFAR100, TEST_TRANSFORM, TRAIN_TRANSFORM, level_index

    cfg = module.check_config(module.Config(device="cpu", download=False, channels_last=False, batch_size=batch_size))
    train_set = CIFAR100(data_root, train=True, transform=TRAIN_TRANSFORM)
    test_set = CIFAR100(data_root, train=False, transform=TEST_TRANSFORM)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=cfg.batch_size, shuffle=True)
    state = module.build(cfg, torch.device("cpu"))
    started = time.perf_counter()
    for step, (images, labels) in enumerate(train_loader):
        if step == n:
            break
        speed.reference_train_step(module, state, images, labels, cfg)
    for step, (images, labels) in enumerate(train_loader):
        if step == n:
            break
        speed.reference_meta_step(module, state, images, labels, cfg)
    correct = 0
    with torch.no_grad():
        for step, (images, labels) in enumerate(test_loader):
            if step == n:
                break
            correct += (state["model"](images)[0].argmax(1) == labels[:, level_index(cfg.primary_level)]).sum()
    print(f"test accuracy {int(correct) / (n * cfg.batch_size):.4f}; loop seconds {time.perf_counter() - started}")


def pieces(data_root: Path, batch_size: int = 100) -> dict[str, float]:
    """Our fixed cost piece by piece (seconds), in this process except the import."""
    import_seconds = float(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import time; t = time.perf_counter(); import model_vgg_maxl; print(time.perf_counter() - t)",
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
        ).stdout
    )

    import torch

    import create_dataset
    import experiment
    import model_vgg_maxl as module

    out = {"import the script (torch, torchvision)": import_seconds}
    cfg = module.check_config(
        module.Config(data_root=str(data_root), download=False, device="cpu", workers=0, batch_size=batch_size)
    )
    experiment.check_run_settings(cfg)
    device = torch.device("cpu")
    started = time.perf_counter()
    loaders = create_dataset.make_loaders(cfg, device, *create_dataset.load_datasets(cfg))  # as the script's main()
    out["load the datasets (md5 once, one read of each file)"] = time.perf_counter() - started
    started = time.perf_counter()
    state = module.build(cfg, device)
    out["build both networks and optimisers"] = time.perf_counter() - started
    _, images, labels = next(experiment.batches(loaders.train, cfg, device))
    times = {}
    for name, step in (
        ("phase 1", functools.partial(module.train_step, state, cfg=cfg, diagnose=False)),
        ("phase 2", functools.partial(module.meta_step, state, cfg=cfg)),
    ):
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            step(images, labels)
            seconds.append(time.perf_counter() - started)
        times[name] = seconds
        out[f"first {name} step's extra time (over the second)"] = seconds[0] - seconds[1]
    checkpoint = {key: obj.state_dict() for key, obj in state.items() if not key.startswith("forward_")}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        experiment.write_atomic(Path(tmp) / "checkpoint.pt", functools.partial(torch.save, checkpoint))
        out["write the checkpoint (torch.save, fsync, rename)"] = time.perf_counter() - started
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--data-root", type=Path, required=True, help="a full-size synthetic CIFAR-100 (made if absent)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command; the median is used")
    parser.add_argument(
        "--ours-repo", type=Path, default=None, help="also time model_vgg_maxl.py of this checkout (an older commit)"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="images per batch (the paper's: 100)")
    parser.add_argument("--reference-process", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_process is not None:
        reference_process(args.reference_process, args.data_root, args.batch_size)
        return
    from create_dataset import CIFAR100, make_synthetic_cifar100

    if not (args.data_root / CIFAR100.base_folder).exists():
        print(f"writing a synthetic CIFAR-100 of the real size into {args.data_root}", flush=True)
        make_synthetic_cifar100(args.data_root, n_train=50_000, n_test=10_000)
    checkouts = ([(str(args.ours_repo), args.ours_repo)] if args.ours_repo else []) + [("ours", REPO)]
    measurements = {
        f"{label}, {'--workers 0' if workers else 'default workers'}": functools.partial(
            ours, args.data_root, workers=workers, repo=repo, batch_size=args.batch_size
        )
        for label, repo in checkouts
        for workers in ("0", None)
    }
    measurements["reference's way"] = functools.partial(reference, args.data_root, batch_size=args.batch_size)
    few, many = BATCHES
    print(
        f"| process | T({few}) s | T({many}) s | s per batch | fixed cost s, intercept "
        f"| epoch s at {few} | fixed cost s, wall - epoch |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, measure in measurements.items():
        runs = {n: [measure(n) for _ in range(args.repeats)] for n in BATCHES}
        wall = {n: statistics.median(r[0] for r in runs[n]) for n in BATCHES}
        per_batch = (wall[many] - wall[few]) / (many - few)
        epoch = statistics.median(r[1] for r in runs[few])
        minus_epoch = statistics.median(r[0] - r[1] for r in runs[few])
        print(
            f"| {name} | {wall[few]:.1f} | {wall[many]:.1f} | {per_batch:.2f} | {wall[few] - few * per_batch:.1f} "
            f"| {epoch:.1f} | {minus_epoch:.1f} |",
            flush=True,
        )
    print("\n| our fixed cost, piece by piece | s |\n|---|---:|")
    for name, seconds in pieces(args.data_root, args.batch_size).items():
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
