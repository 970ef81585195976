"""The start-up benchmark's parts run on CPU: our script as a process, the reference's way, the pieces."""

from __future__ import annotations

import math

import conftest  # noqa: F401  (puts the repository root on sys.path)

from benchmarks import startup


def test_our_process_reports_its_wall_and_epoch_time(data_root):
    wall, epoch = startup.ours(data_root, 1, "0", batch_size=2)
    assert 0 < epoch < wall


def test_the_reference_process_runs_its_loop(data_root):
    wall, loop = startup.reference(data_root, 1, batch_size=2)
    assert 0 < loop < wall


def test_the_pieces_cover_launch_to_checkpoint(data_root):
    pieces = startup.pieces(data_root, batch_size=2)
    assert [name.split(" (")[0] for name in pieces] == [
        "import the script",
        "load the datasets",
        "build both networks and optimisers",
        "first phase 1 step's extra time",
        "first phase 2 step's extra time",
        "write the checkpoint",
    ]
    assert all(math.isfinite(seconds) for seconds in pieces.values())
    assert all(seconds > 0 for name, seconds in pieces.items() if "extra" not in name)
