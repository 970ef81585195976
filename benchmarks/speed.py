"""Speed benchmark of the training iteration of every method (VGG-16 or --backbones, CIFAR-100-shaped batches).

One iteration is one batch's share of a real epoch, run by the scripts' own `build`, `train_step` and meta steps
(through experiment.StepGraphs, as in training: CUDA graphs on CUDA unless --no-cuda-graphs):
  single, human   one `train_step`.
  maxl-*, wamal-* one phase-1 `train_step` (with the gradient cosine on every --cossim-every-th iteration, as in
                  training) plus one phase-2 step (MAXL's `meta_step`, WAMAL's `wamal_meta_step`).
  maoal           one `train_step` plus 1/--meta-every of a `meta_step` (lambda's hypergradient on a developing
                  batch): both timed every iteration, the second counted at its share (phase_weights).
  autol-*         Auto-Lambda on its 20 domains: one `train_step` (a batch of every domain) plus, autol-second-order
                  and autol-finite-difference, one `meta_step`, each counted at a 1/20 share: one domain's batch
                  (autol-equal: the weighting baseline, the training step alone).
Each script's Config gets only the speed flags and the backbone, as flags, and is resolved by the script's
`check_config` (and experiment.check_run_settings) as a run resolves them; a method whose script refuses a backbone
is skipped with its reason. The batch is random: uint8 pixels normalised as the loaders do, consistent 4-level
hierarchy labels. --reference-style adds MAXL done the authors' way (`reference_train_step`,
`reference_meta_gradients`: this code exists only here, the scripts never run it). The columns, the flags and the
measured tables: benchmarks/README.md.

    python benchmarks/speed.py --device cpu --reference-style --markdown
    python benchmarks/speed.py --device cuda --amp --compile --json results/speed-cuda.json
    python benchmarks/speed.py --device cuda --backbones vgg16,resnet18,resnet50,vit_b_16 --markdown
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import gc
import importlib
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import experiment  # noqa: E402
from create_dataset import FINE_TO_COARSE, hierarchy_labels, normalize, primary_labels  # noqa: E402

METHODS = ("single", "human", "maxl-second-order", "maxl-finite-difference", "wamal-second-order", "maoal")
METHODS += ("maxl-double-backward", "wamal-finite-difference", "wamal-double-backward")  # not measured by default
METHODS += ("autol-second-order", "autol-finite-difference", "autol-equal")
DEFAULT_METHODS = METHODS[:6]
REFERENCE_STYLE = "maxl-second-order (reference-style)"
TARGET_RATIO = 0.6  # the CPU target: our MAXL iteration at most 0.6x the reference-style one
TRAIN_IMAGES = 50_000  # CIFAR-100 train set
PAPER_EPOCHS = 200
DEFAULT_WARMUP_ITERS = {"cpu": (1, 3), "cuda": (50, 100)}  # (warm-up, timed) iterations when no flag is given
RSS_SAMPLE_SECONDS = 0.005
CONTENTION_THRESHOLD = 0.05  # other processes' share of the CPU above which CPU timings are flagged
EAGER_NETWORKS = {"forward_model": "model", "forward_generator": "label_generator"}  # build()'s compiled -> eager


@dataclass(frozen=True)
class Method:
    name: str  # the row's label
    script: str  # module name of the model script
    meta_grad: str | None = None  # MAXL, WAMAL and Auto-Lambda: Config.meta_grad (autol-equal: None)
    reference_style: bool = False  # MAXL only: the reference's wasted passes re-enabled
    backbone: str = "vgg16"  # Config.backbone

    @property
    def is_maxl(self) -> bool:
        """MAXL or WAMAL: phase 1 (train_step with the periodic cosine diagnostic) and phase 2 (the meta step)."""
        return self.script in ("model_vgg_maxl", "model_vgg_wamal")

    @property
    def is_autol(self) -> bool:
        """Auto-Lambda: train_step on a batch of every domain and (not autol-equal) meta_step, a domain's share each."""
        return self.script == "model_vgg_autol"

    @property
    def is_maoal(self) -> bool:
        """MAOAL: train_step every batch, and meta_step (lambda's hypergradient) every --meta-every batches."""
        return self.script == "model_vgg_maoal"


def method_spec(name: str, backbone: str = "vgg16") -> Method:
    """The method `name` (one of METHODS, or REFERENCE_STYLE) on `backbone`; its row is named
    "name/backbone", or "name" alone on vgg16."""
    label = name if backbone == "vgg16" else f"{name}/{backbone}"
    if name == REFERENCE_STYLE:
        if backbone != "vgg16":
            raise ValueError(f"{REFERENCE_STYLE} is VGG-16 only (got backbone {backbone})")
        return Method(name, "model_vgg_maxl", "double-backward", reference_style=True)
    if name == "autol-equal":
        return Method(label, "model_vgg_autol", backbone=backbone)
    for method in ("maxl", "wamal", "autol"):
        if name.startswith(f"{method}-"):
            return Method(label, f"model_vgg_{method}", name.removeprefix(f"{method}-"), backbone=backbone)
    return Method(label, f"model_vgg_{name}", backbone=backbone)


# Everything this benchmark uses of the model scripts, in one place: a renamed function there must fail here in one
# clear line, not deep inside a measurement. The run machinery (check_run_settings, configure_backends, StepGraphs,
# autocast) is experiment.py's.
STEP_NAMES = ("Config", "check_config", "build", "train_step")
META_STEPS = {"model_vgg_maxl": "meta_step", "model_vgg_wamal": "wamal_meta_step", "model_vgg_maoal": "meta_step"}
SCRIPT_NAMES = {
    "model_vgg_single": STEP_NAMES,
    "model_vgg_human": STEP_NAMES,
    # meta_step for our MAXL; the reference-style steps use the losses and the cosine diagnostic.
    "model_vgg_maxl": (*STEP_NAMES, "meta_step", "focal_loss", "negative_entropy", "gradient_cosine"),
    "model_vgg_wamal": (*STEP_NAMES, "wamal_meta_step"),
    "model_vgg_maoal": (*STEP_NAMES, "meta_step"),
    "model_vgg_autol": (*STEP_NAMES, "meta_step", "domain_targets", "task_domains"),
}


def script(method: Method):
    """The method's model script (importing one never trains or writes anything), checked for SCRIPT_NAMES."""
    module = importlib.import_module(method.script)
    missing = [name for name in SCRIPT_NAMES[method.script] if not hasattr(module, name)]
    if missing:
        raise SystemExit(
            f"error: benchmarks/speed.py uses {', '.join(missing)} from {method.script}.py, which does not define "
            f"{'it' if len(missing) == 1 else 'them'}; update SCRIPT_NAMES in benchmarks/speed.py and the code using it"
        )
    return module


def optimizers(state: dict) -> list[torch.optim.Optimizer]:
    """The state's optimisers: those whose learning-rate changes drop StepGraphs' graphs, as in the scripts' main()."""
    return [obj for obj in state.values() if isinstance(obj, torch.optim.Optimizer)]


# ---------------------------------------------------------------------------------------------
# The reference's way (only for --reference-style)


def reference_train_step(module, state: dict, images: torch.Tensor, labels: torch.Tensor, cfg) -> dict:
    """Phase 1 as the reference scripts run it: `module.train_step`'s theta_1 update, plus their two wasted passes.

    - the label generator runs WITH autograd and the total loss is backpropagated into it too (a full backward
      through the generator's VGG-16), its .grad then thrown away (zeroed before phase 2 uses its optimiser);
    - the gradient-cosine diagnostic on EVERY step: two extra autograd.grad passes w.r.t. every parameter of the
      multi-task network (allow_unused, as the reference asks), the cosine taken over the trunk's tensors.
    """
    model, optimizer = state["model"], state["optimizer"]
    primary = primary_labels(labels, cfg)
    with experiment.autocast(cfg, images.device):
        aux_targets = state["forward_generator"](images, primary)  # with autograd, as the reference
        primary_logits, aux_logits = state["forward_model"](images)
    primary_loss = module.focal_loss(primary_logits, F.one_hot(primary, cfg.primary_level).float(), cfg.focal_gamma)
    aux_loss = module.focal_loss(aux_logits, aux_targets, cfg.focal_gamma)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    primary_grads = torch.autograd.grad(primary_loss, params, retain_graph=True, allow_unused=True)
    aux_grads = torch.autograd.grad(aux_loss, params, retain_graph=True, allow_unused=True)
    trunk = [i for i, (name, _) in enumerate(named) if name.startswith("block")]
    cosine = module.gradient_cosine([primary_grads[i] for i in trunk], [aux_grads[i] for i in trunk])
    optimizer.zero_grad(set_to_none=True)
    state["gen_optimizer"].zero_grad(set_to_none=True)
    loss = primary_loss + aux_loss
    loss.backward()  # fills theta_1 and theta_2 gradients
    optimizer.step()
    state["gen_optimizer"].zero_grad(set_to_none=True)  # the generator's gradients were never needed
    return {"loss": loss, "train_primary_loss": primary_loss, "train_cosine": cosine}


def reference_meta_gradients(module, state: dict, images: torch.Tensor, labels: torch.Tensor, cfg) -> list:
    """Phase 2's theta_2 gradient as the reference scripts compute it; returns it (also left in .grad).

    The exact gradient by double backward, with the reference's extra work:
      - the forward at theta_1 is the multi-task network's own module call in train mode, so it also updates its
        BatchNorm running statistics (the script's meta step runs it on throw-away buffer copies). In the reference
        this is the very pass whose graph the create_graph inner gradient differentiates, so it runs once here too;
      - a full `.backward()` of the meta objective, which also fills the unused gradients of every theta_1
        parameter (Hessian-vector terms included), instead of `autograd.grad` w.r.t. theta_2 only.
    theta_1^+ goes through torch.func.functional_call on the same module (the reference: a hand-written functional
    copy of the network, the same arithmetic), with batch statistics and copied buffers. The result equals
    `module.meta_gradients(..., method="double-backward")` (tests check it).
    """
    model, label_generator = state["model"], state["label_generator"]
    primary = primary_labels(labels, cfg)
    primary_target = F.one_hot(primary, cfg.primary_level).float()
    inner_lr = state["optimizer"].param_groups[0]["lr"]
    with experiment.autocast(cfg, images.device):
        primary_logits, aux_logits = model(images)  # train mode: BN running statistics updated
        generated = label_generator(images, primary)
        train_loss = module.focal_loss(primary_logits, primary_target, cfg.focal_gamma) + module.focal_loss(
            aux_logits, generated, cfg.focal_gamma
        )
        theta1 = dict(model.named_parameters())
        grads = torch.autograd.grad(train_loss, list(theta1.values()), create_graph=True)
        theta1_plus = {name: p - inner_lr * g for (name, p), g in zip(theta1.items(), grads)}
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        primary_plus = functional_call(model, (theta1_plus, buffers), (images,))[0]
        objective = module.focal_loss(
            primary_plus, primary_target, cfg.focal_gamma
        ) + cfg.entropy_weight * module.negative_entropy(generated)
    state["optimizer"].zero_grad(set_to_none=True)
    state["gen_optimizer"].zero_grad(set_to_none=True)
    objective.backward()  # theta_2 and (wasted) theta_1 gradients
    return [p.grad for p in label_generator.parameters()]


def reference_meta_step(module, state: dict, images: torch.Tensor, labels: torch.Tensor, cfg) -> None:
    """Phase 2 as the reference: `reference_meta_gradients`, then the generator's SGD step."""
    reference_meta_gradients(module, state, images, labels, cfg)
    state["gen_optimizer"].step()


# ---------------------------------------------------------------------------------------------
# Configuration, data, the iteration


def checked_config(method: Method, **flags):
    """The script's Config with the backbone and `flags` set as a run's command line sets them, checked and resolved
    by the script's check_config and experiment.check_run_settings (image size 32 on CIFAR-100, the ResNets' stem)."""
    module = script(method)
    cfg = module.check_config(module.Config(backbone=method.backbone, **flags, flags_given=("backbone", *flags)))
    experiment.check_run_settings(cfg)
    return cfg


def refusal(method: Method) -> str:
    """Why the method's script refuses the method's backbone in its default task, as a run would; "" if it runs."""
    try:
        checked_config(method)
    except experiment.UsageError as error:
        return str(error)
    return ""


def make_config(method: Method, device: torch.device, args: argparse.Namespace):
    """The script's Config with its defaults, only the speed flags and the backbone changed, as a run resolves it."""
    flags = dict(
        device=str(device),
        batch_size=args.batch_size,
        amp=args.amp,
        compile=args.compile,
        channels_last=args.channels_last,
        cuda_graphs=args.cuda_graphs,
        download=False,
        workers=0,
    )
    if method.is_autol:
        flags["weighting"] = "equal" if method.meta_grad is None else "autol"
        if method.meta_grad is not None:
            flags["meta_grad"] = method.meta_grad
    if method.is_maxl:
        flags["meta_grad"] = method.meta_grad
        if method.reference_style:
            flags["cossim_every"] = 1  # the reference computes the diagnostic on every step
        elif args.cossim_every is not None:
            flags["cossim_every"] = args.cossim_every
    try:
        return checked_config(method, **flags)
    except experiment.UsageError as error:
        raise SystemExit(f"error: {method.name}: {method.script}.py refuses these settings: {error}") from None


def random_batch(batch_size: int, device: torch.device, channels_last: bool, seed: int = 0) -> tuple:
    """32x32 images normalised from random uint8 pixels, and consistent (N, 4) hierarchy labels (CIFAR-100's)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    fine = torch.randint(0, 100, (batch_size,), generator=generator).numpy()
    coarse = np.asarray(FINE_TO_COARSE, dtype=np.int64)[fine]
    labels = torch.from_numpy(hierarchy_labels(fine, coarse)).to(device)
    images = normalize(pixels.to(device))
    if channels_last:  # as experiment.batches()
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def iteration_phases(
    method: Method, state: dict, graphs, images, labels, cfg
) -> list[tuple[str, Callable[[int], object]]]:
    """The timed pieces of one iteration, each a function of the iteration index k. As in the scripts' epochs, each
    step goes through `graphs` (experiment.StepGraphs) under the same names; the reference-style steps are eager."""
    module = script(method)
    train = functools.partial(module.train_step, state, cfg=cfg)
    if method.reference_style:
        return [
            ("phase 1", lambda k: reference_train_step(module, state, images, labels, cfg)),
            ("phase 2", lambda k: reference_meta_step(module, state, images, labels, cfg)),
        ]
    if method.is_autol:  # a batch of every domain, and the primary domain's meta batch
        drawn = [random_batch(len(images), images.device, cfg.channels_last, seed=1 + t) for t in range(21)]
        task_batches = [(x, module.domain_targets(y)) for x, y in drawn[: len(module.task_domains(cfg))]]
        meta_batch = (drawn[-1][0], module.domain_targets(drawn[-1][1]))
        phases = [("phase 1", lambda k: module.train_step(state, task_batches, cfg))]  # eager, as in the script
        if cfg.weighting == "autol":
            phases.append(("phase 2", lambda k: module.meta_step(state, task_batches, meta_batch, cfg)))
        return phases
    if method.is_maoal:
        dev_images, dev_labels = random_batch(len(images), images.device, cfg.channels_last, seed=1)
        return [
            ("phase 1", lambda k: graphs("train", train, images, labels)),
            # Eager, as in the script's epoch; timed every iteration, counted once every --meta-every (phase_weights).
            ("phase 2", lambda k: module.meta_step(state, images, labels, dev_images, dev_labels, cfg)),
        ]
    if not method.is_maxl:
        return [("train", lambda k: graphs("train", train, images, labels))]
    phase1 = {diagnose: functools.partial(train, diagnose=diagnose) for diagnose in (False, True)}
    phase2 = functools.partial(getattr(module, META_STEPS[method.script]), state, cfg=cfg)

    def run_phase1(k: int):
        diagnose = is_diagnostic(k, cfg)
        return graphs("phase 1 + cosine" if diagnose else "phase 1", phase1[diagnose], images, labels)

    return [("phase 1", run_phase1), ("phase 2", lambda k: graphs("phase 2", phase2, images, labels))]


def phase_weights(method: Method, cfg) -> list[float]:
    """How much of each phase one training iteration costs: MAOAL's meta step runs once every --meta-every."""
    if method.is_maoal:
        return [1.0, 1.0 / cfg.meta_every]
    if method.is_autol:  # one step takes a batch of every domain: one domain's batch is its share
        return [1.0 / len(script(method).task_domains(cfg))] * 2
    return [1.0, 1.0] if method.is_maxl else [1.0]


def is_diagnostic(k: int, cfg) -> bool:
    """Whether iteration k computes the gradient cosine (as train_epoch: step % cossim_every == 0)."""
    return k % cfg.cossim_every == 0


def periodic_diagnostic(method: Method, cfg) -> int:
    """N when one iteration in N carries the cosine diagnostic (MAXL, ours), else 1 (none or every step)."""
    return cfg.cossim_every if method.is_maxl and not method.reference_style else 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_iterations(phases, start: int, count: int, device: torch.device) -> list[list[float]]:
    """Seconds of each phase of iterations start .. start + count - 1."""
    times = []
    for k in range(start, start + count):
        synchronize(device)
        marks = [time.perf_counter()]
        for _, run in phases:
            run(k)
            synchronize(device)
            marks.append(time.perf_counter())
        times.append([b - a for a, b in zip(marks, marks[1:])])
    return times


def extra_flop_formulas() -> dict:
    """ViT's attention on CPU, which torch.utils.flop_counter counts only in the CUDA kernels: the same formulas
    (QK^T and AV, and their backward), where this torch has the op and does not count it already."""

    def of_shapes(formula, n: int):  # the formula of the op's first n tensors (the others: dropout, scale, ...)
        return lambda *shapes, out_shape=None, **kwargs: formula(*shapes[:n])

    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu": of_shapes(flop_counter.sdpa_flop_count, 3),
        "_scaled_dot_product_flash_attention_for_cpu_backward": of_shapes(flop_counter.sdpa_backward_flop_count, 4),
    }
    ops = {getattr(torch.ops.aten, name, None): formula for name, formula in formulas.items()}
    return {op: formula for op, formula in ops.items() if op is not None and op not in flop_counter.flop_registry}


def count_flops(method: Method, phases, cfg) -> float:
    """Matmul/conv FLOPs of one iteration, as an epoch averages them (diagnostic amortised, phases weighted)."""

    def flops(run: Callable[[int], object], k: int) -> float:
        counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
        with counter:
            run(k)
        return float(counter.get_total_flops())

    (_, phase1), *others = phases
    counts = [flops(phase1, 0)]  # iteration 0: with the cosine diagnostic where there is one
    every = periodic_diagnostic(method, cfg)
    if every > 1:
        plain = flops(phase1, 1)
        counts = [plain + (counts[0] - plain) / every]
    counts += [flops(run, 0) for _, run in others]
    return sum(w * count for w, count in zip(phase_weights(method, cfg), counts))


# ---------------------------------------------------------------------------------------------
# Memory and the CPU's other users


def current_rss() -> int | None:
    """Resident set size in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def max_rss() -> int:
    """The process's lifetime peak RSS in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def release_memory(device: torch.device) -> None:
    """Free what the previous method left, so the next baseline is clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages resident otherwise


class PeakMemory:
    """Peak memory while active, in bytes above the level at entry. CUDA: torch.cuda.max_memory_allocated (tensors
    only). CPU: RSS sampled every 5 ms by a thread, and ru_maxrss where the process's lifetime peak rose inside the
    block (exact then; earlier methods can hide it otherwise)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: float = float("nan")

    def __enter__(self):
        release_memory(self.device)
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base, self.base_max = current_rss(), max_rss()
        self.sampled, self.stop, self.thread = self.base or 0, threading.Event(), None
        if self.base is not None:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(RSS_SAMPLE_SECONDS):
            self.sampled = max(self.sampled, current_rss() or 0)

    def __exit__(self, *exc):
        synchronize(self.device)
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
            return False
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        peak = max(self.sampled, current_rss() or 0)
        if max_rss() > self.base_max:
            peak = max(peak, max_rss())
        self.peak_bytes = peak - (self.base if self.base is not None else self.base_max)
        return False


class OtherCpuUse:
    """Share of the machine's CPU time that other processes used while active (Linux; else NaN): busy time from
    /proc/stat minus this process's own, over wall time x CPUs. A few percent is noise; much more inflates the CPU
    timings (with OpenMP, by far more than the share suggests)."""

    def __enter__(self):
        self.start = (self.busy_seconds(), self.own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy, own, wall = self.busy_seconds(), self.own_seconds(), time.perf_counter()
        capacity = (wall - self.start[2]) * (os.cpu_count() or 1)
        self.share = ((busy - self.start[0]) - (own - self.start[1])) / capacity if capacity > 0 else float("nan")
        return False

    @staticmethod
    def busy_seconds() -> float:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own_seconds() -> float:
        """CPU seconds of this process and its finished children (live helpers, e.g. compile workers: others)."""
        return sum(
            usage.ru_utime + usage.ru_stime
            for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )


# ---------------------------------------------------------------------------------------------
# One measurement


def measure(method: Method, device: torch.device, args: argparse.Namespace) -> dict:
    """Build the method's state on `device`, warm up, time, count FLOPs; returns the table row."""
    module = script(method)
    cfg = make_config(method, device, args)
    warmup, iters = warmup_iters(device, args)
    experiment.configure_backends(cfg, device)  # the scripts' seeds and cudnn.benchmark setting
    images, labels = random_batch(args.batch_size, device, cfg.channels_last)
    with PeakMemory(device) as memory, OtherCpuUse() as others:
        state = module.build(cfg, device)
        graphs = experiment.StepGraphs(optimizers(state), device, enabled=cfg.cuda_graphs)
        phases = iteration_phases(method, state, graphs, images, labels, cfg)
        # FLOPs: an eager iteration of the uncompiled networks (FlopCounterMode counts eager ops). Without --compile
        # it is also the first warm-up iteration; with --compile, or with --warmup 0, it is extra and comes last.
        eager_state = state | {key: state[name] for key, name in EAGER_NETWORKS.items() if key in state}
        eager_phases = iteration_phases(
            method, eager_state, experiment.StepGraphs([], device, False), images, labels, cfg
        )
        counted_as_warmup = warmup > 0 and not cfg.compile
        if counted_as_warmup:
            flops = count_flops(method, eager_phases, cfg)
        timed_iterations(phases, 1 if counted_as_warmup else 0, warmup - counted_as_warmup, device)
        # Timed iterations start at a multiple of the cosine period, so they hold their share of it.
        first = math.ceil(warmup / cfg.cossim_every) * cfg.cossim_every if method.is_maxl else warmup
        times = timed_iterations(phases, first, iters, device)
        if not counted_as_warmup:
            flops = count_flops(method, eager_phases, cfg)
        phase_names = [name for name, _ in phases]
    del state, eager_state, phases, eager_phases
    release_memory(device)
    # An epoch's average iteration: where one in cossim_every carries the cosine diagnostic, the plain median plus
    # its share of the diagnostic's extra time; else the median.
    totals = [sum(w * seconds for w, seconds in zip(phase_weights(method, cfg), t)) for t in times]
    epoch_mean = statistics.median(totals)
    if periodic_diagnostic(method, cfg) > 1:
        with_cosine = [t for k, t in enumerate(totals, first) if is_diagnostic(k, cfg)]
        plain = [t for k, t in enumerate(totals, first) if not is_diagnostic(k, cfg)]
        if with_cosine and plain:
            plain_median = statistics.median(plain)
            epoch_mean = plain_median + (statistics.median(with_cosine) - plain_median) / cfg.cossim_every
    return {
        **dict(method=method.name, backbone=cfg.backbone, stem=cfg.stem, image_size=cfg.image_size, device=str(device)),
        **dict(batch_size=cfg.batch_size, warmup=warmup, iters=iters),
        "ms_median": 1e3 * statistics.median(totals),
        "ms_min": 1e3 * min(totals),
        "ms_epoch_mean": 1e3 * epoch_mean,
        "phase_ms_median": {name: 1e3 * statistics.median(t[i] for t in times) for i, name in enumerate(phase_names)},
        "images_per_s": cfg.batch_size / epoch_mean,
        "hours_200_epochs": epoch_mean * math.ceil(TRAIN_IMAGES / cfg.batch_size) * PAPER_EPOCHS / 3600,
        "peak_mib": memory.peak_bytes / 2**20,
        "tflop_per_iter": flops / 1e12,
        "tflop_per_s": flops / 1e12 / epoch_mean,
        "cossim_every": cfg.cossim_every if method.is_maxl else None,
        "meta_grad": cfg.meta_grad if method.is_maxl or (method.is_autol and cfg.weighting == "autol") else None,
        "amp": cfg.amp and device.type == "cuda",
        "compile": cfg.compile,
        "channels_last": cfg.channels_last,
        "cuda_graphs": cfg.cuda_graphs and device.type == "cuda",
        "times_ms": [[1e3 * s for s in t] for t in times],
        "other_processes_cpu_share": others.share,
    }


def warm_runtime(device: torch.device, args: argparse.Namespace, backbone: str = "vgg16") -> None:
    """One untimed Single step at the benchmark's shapes before the first row of a backbone on a device: the
    first network run in a process pays one-time costs (thread pool, oneDNN/cuDNN primitives for the backbone's
    layer shapes, allocator growth) that would otherwise land in the first row's memory and warm-up."""
    method = method_spec("single", backbone)
    module = script(method)
    cfg = make_config(method, device, args)
    images, labels = random_batch(args.batch_size, device, cfg.channels_last)
    state = module.build(cfg, device)
    module.train_step(state, images, labels, cfg)
    synchronize(device)
    del state
    release_memory(device)


def warmup_iters(device: torch.device, args: argparse.Namespace) -> tuple[int, int]:
    warmup, iters = DEFAULT_WARMUP_ITERS["cuda" if device.type == "cuda" else "cpu"]
    return (warmup if args.warmup is None else args.warmup), (iters if args.iters is None else args.iters)


# ---------------------------------------------------------------------------------------------
# Output


COLUMNS = (
    ("method", "method", "{}"),
    ("ms_median", "ms/iter median", "{:.1f}"),
    ("ms_min", "ms/iter min", "{:.1f}"),
    ("ms_epoch_mean", "ms/iter epoch mean", "{:.1f}"),
    ("phase1", "phase 1 ms", "{:.1f}"),
    ("phase2", "phase 2 ms", "{:.1f}"),
    ("images_per_s", "images/s", "{:.1f}"),
    ("hours_200_epochs", "h / 200 epochs", "{:.2f}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
    ("tflop_per_iter", "TFLOP/iter", "{:.4f}"),
    ("tflop_per_s", "TFLOP/s", "{:.3f}"),
)


def cells(row: dict) -> list[str]:
    phases = row["phase_ms_median"]
    values = {**row, "phase1": phases.get("phase 1"), "phase2": phases.get("phase 2")}
    missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v))
    return ["-" if missing(values[key]) else fmt.format(values[key]) for key, _, fmt in COLUMNS]


def format_table(rows: list[dict], markdown: bool = False) -> str:
    header = [title for _, title, _ in COLUMNS]
    body = [cells(row) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    align = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([align(header), "  ".join("-" * w for w in widths), *map(align, body)])


def header_line(device: torch.device, args: argparse.Namespace) -> str:
    warmup, iters = warmup_iters(device, args)
    cuda = device.type == "cuda"
    threads = f", {torch.get_num_threads()} torch threads"
    name = torch.cuda.get_device_name(device) if cuda else experiment.processor_name() + threads
    flags = {"amp": args.amp and cuda, "compile": args.compile, "channels_last": args.channels_last}
    flags["cuda graphs"] = args.cuda_graphs and cuda
    return (
        f"device {device} ({name}) | torch {torch.__version__} | "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | batch {args.batch_size} | "
        f"warm-up {warmup}, timed iterations {iters} | "
        + ", ".join(f"{flag} {'on' if on else 'off'}" for flag, on in flags.items())
    )


def contended(row: dict) -> bool:
    """Whether other processes took a noticeable share of the CPU while this row was measured."""
    return row["device"] == "cpu" and row.get("other_processes_cpu_share", 0.0) > CONTENTION_THRESHOLD


def reference_ratio(rows: list[dict]) -> dict | None:
    """Our second-order MAXL iteration over the reference-style one (time and FLOPs)."""
    by_name = {row["method"]: row for row in rows}
    ours, ref = by_name.get("maxl-second-order"), by_name.get(REFERENCE_STYLE)
    if ours is None or ref is None:
        return None
    return {
        "device": ours["device"],
        "time_epoch_mean": ours["ms_epoch_mean"] / ref["ms_epoch_mean"],
        "time_median": ours["ms_median"] / ref["ms_median"],
        "flops": ours["tflop_per_iter"] / ref["tflop_per_iter"],
        "target": TARGET_RATIO,
        "contended": contended(ours) or contended(ref),
    }


def ratio_line(ratio: dict) -> str:
    verdict = "meets" if ratio["time_epoch_mean"] <= ratio["target"] else "misses"
    line = (
        f"maxl-second-order / reference-style on {ratio['device']}: time {ratio['time_epoch_mean']:.3f} "
        f"(epoch mean; median {ratio['time_median']:.3f}), FLOPs {ratio['flops']:.3f}; "
        f"{verdict} the target <= {ratio['target']}"
    )
    if ratio["contended"]:
        line += " -- UNRELIABLE: other processes used the CPU during these rows; rerun on an idle machine"
    return line


def backbone_line(rows: list[dict]) -> str | None:
    """How the rows' backbones other than vgg16 were resolved (as `--backbone X` on CIFAR-100); None if none."""
    resolved = {}
    for row in rows:
        if row["backbone"] != "vgg16":
            stem = f", {row['stem']} stem" if row["stem"] else ""
            patches = f", {(row['image_size'] // 16) ** 2} patches of 16x16" if row["backbone"] == "vit_b_16" else ""
            resolved[row["backbone"]] = f"{row['backbone']} (image size {row['image_size']}{stem}{patches})"
    if not resolved:
        return None
    return (
        "backbones as the scripts resolve them for CIFAR-100 (their check_config; torchvision's, headless, "
        "from scratch; random 32x32 batches): " + "; ".join(resolved.values())
    )


def report(device: torch.device, rows: list[dict], args: argparse.Namespace, skipped: tuple[str, ...] = ()) -> str:
    memory = "torch.cuda.max_memory_allocated above the level before build"
    if device.type != "cuda":
        memory = "CPU: peak RSS above the RSS before build; sampled every 5 ms + ru_maxrss"
    notes = [
        f"one iteration = one batch of one epoch (MAXL: phase 1 + phase 2); hours = epoch-mean ms x "
        f"{math.ceil(TRAIN_IMAGES / args.batch_size)} iterations x {PAPER_EPOCHS} epochs, training only",
        f"peak MiB ({memory}); FLOPs: matmul/conv ops by torch.utils.flop_counter",
        *filter(None, [backbone_line(rows)]),
        *skipped,
    ]
    if device.type == "cpu":
        shares = ", ".join(f"{row['method']} {max(0.0, 100 * row['other_processes_cpu_share']):.0f}%" for row in rows)
        notes.append(f"CPU time taken by other processes during each row (should be ~0%): {shares}")
        if any(contended(row) for row in rows):
            notes.append("WARNING: the CPU was shared with other processes; these CPU timings are inflated")
    ratio = reference_ratio(rows)
    if ratio is not None:
        notes.append(ratio_line(ratio))
    header = header_line(device, args)
    lines = [header, format_table(rows), *notes]
    if args.markdown:
        lines += ["", f"**{header}**", "", format_table(rows, markdown=True), "", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add, on_off = parser.add_argument, argparse.BooleanOptionalAction
    add("--device", action="append", help="cpu, cuda, cuda:N or all (every CUDA device and the CPU); may be repeated. "
        "Default: cuda if available, else cpu")  # fmt: skip
    add("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    add("--backbones", nargs="+", default=["vgg16"], metavar="BACKBONE",
        help=f"measure each method on each of these, comma- or space-separated: {', '.join(experiment.BACKBONES)} "
        "(rows of vgg16, the paper's, are named by the method alone, the others method/backbone)")  # fmt: skip
    add("--batch-size", type=int, default=100, help="images per batch (the paper: 100)")
    add("--warmup", type=int, default=None, help="untimed iterations first (default: 1 on CPU, 50 on CUDA)")
    add("--iters", type=int, default=None, help="timed iterations (default: 3 on CPU, 100 on CUDA)")
    add("--amp", action="store_true", help="bf16 autocast (the scripts apply it on CUDA only)")
    add("--compile", action="store_true", help="torch.compile the scripts' plain forward passes")
    add("--channels-last", action=on_off, default=True,
        help="channels_last memory format, as the scripts' default (also the reference-style row)")  # fmt: skip
    add("--cuda-graphs", action=on_off, default=True, help="replay the scripts' steps as CUDA graphs, as the scripts "
        "do on CUDA (not the reference-style row)")  # fmt: skip
    add("--reference-style", action="store_true", help=f"also time '{REFERENCE_STYLE}': MAXL with the reference "
        "scripts' wasted passes, and print the ratio")  # fmt: skip
    add("--cossim-every", type=int, default=None, help="MAXL's gradient-cosine period (default: the script's, 10)")
    add("--markdown", action="store_true", help="also print the table in markdown")
    add("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    for name in ("batch_size", "iters", "cossim_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    args.backbones = list(dict.fromkeys(name for value in args.backbones for name in value.split(",") if name))
    unknown = [name for name in args.backbones if name not in experiment.BACKBONES]
    if unknown or not args.backbones:
        known = ", ".join(experiment.BACKBONES)
        parser.error(f"--backbones: {', '.join(unknown) or 'none given'}; choose from {known}")
    return args


def resolve_devices(names: list[str] | None) -> list[torch.device]:
    cuda = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if not names:
        return cuda[:1] or [torch.device("cpu")]
    devices: list[torch.device] = []
    for name in names:
        if name == "all":
            chosen = [*cuda, torch.device("cpu")]
        elif name.startswith("cuda"):
            device = torch.device(name if ":" in name else "cuda:0")
            if device not in cuda:
                raise SystemExit(f"error: --device {name}: no such CUDA device (torch {torch.__version__})")
            chosen = [device]
        elif name == "cpu":
            chosen = [torch.device("cpu")]
        else:
            raise SystemExit(f"error: --device {name!r} is not cpu, cuda, cuda:N or all")
        devices += [d for d in chosen if d not in devices]
    return devices


def method_list(args: argparse.Namespace) -> tuple[list[Method], list[str]]:
    """The rows to measure, grouped by backbone in --backbones order, and a note for each one skipped.

    The reference-style row is VGG-16's only; with --reference-style, maxl-second-order on vgg16 (what
    it is compared with) is measured whatever --methods and --backbones say."""
    names = list(dict.fromkeys(args.methods))
    backbones = list(args.backbones)
    if args.reference_style:
        if "vgg16" not in backbones:
            print("note: --reference-style is VGG-16 only: maxl-second-order on vgg16 is added", file=sys.stderr)
            backbones.insert(0, "vgg16")
        elif "maxl-second-order" not in names:
            print("note: --reference-style compares with maxl-second-order, which is added", file=sys.stderr)
    methods, skipped = [], []
    for backbone in backbones:
        chosen = names if backbone in args.backbones else []
        if args.reference_style and backbone == "vgg16":
            chosen = [*chosen, "maxl-second-order"] if "maxl-second-order" not in chosen else list(chosen)
            chosen.insert(chosen.index("maxl-second-order") + 1, REFERENCE_STYLE)
        for name in chosen:
            method = method_spec(name, backbone)
            reason = refusal(method)
            if reason:
                skipped.append(f"{method.name} skipped: {method.script}.py refuses {reason}")
                print(f"note: {skipped[-1]}", file=sys.stderr)
                continue
            methods.append(method)
    return methods, skipped


def finite_or_null(obj):
    """NaN (a quantity this platform cannot measure) as JSON null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(value) for value in obj]
    return obj


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    devices = resolve_devices(args.device)
    methods, skipped = method_list(args)
    if not methods:
        raise SystemExit("error: nothing to measure: " + "; ".join(skipped))
    results = []
    for device in devices:
        if device.type == "cpu" and args.amp:
            print("note: the scripts apply --amp on CUDA only; on CPU it changes nothing")
        rows = []
        for i, method in enumerate(methods):
            if i == 0 or method.backbone != methods[i - 1].backbone:
                warm_runtime(device, args, method.backbone)
            started = time.perf_counter()
            rows.append(measure(method, device, args))
            print(f"  {method.name} on {device}: done in {time.perf_counter() - started:.0f}s", flush=True)
        print("\n" + report(device, rows, args, tuple(skipped)) + "\n", flush=True)
        ratio = reference_ratio(rows)
        results.append(
            {"header": header_line(device, args), "rows": rows, "reference_ratio": ratio, "skipped": skipped}
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"argv": sys.argv[1:], "devices": results}
        args.json.write_text(json.dumps(finite_or_null(document), indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
