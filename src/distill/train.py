"""The training loop: one readable function for teachers, hard-label baselines and distilled students.

Runs on ``accelerate`` (device placement, mixed precision, data-parallel processes). A step consumes
``batch_size`` examples in ``grad_accum`` micro-batches; every micro-batch loss is weighted by its share
of the global batch, so the gradient is the mean over the global batch whatever the split. Checkpoints
(model, optimizer, scheduler, RNG, position in the epoch) are written atomically and a resumed run
reaches exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from distill import parallel
from distill.errors import DistillError
from distill.io import STAGE_DONE as STAGE_DONE  # its home is io; still importable from here
from distill.io import atomic_path
from distill.losses import IGNORE_INDEX
from distill.losses.divergences import distillation_loss
from distill.recipe import DistillSpec, TrainSpec

TeacherSignal = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_accelerator(mixed_precision: str = "no", log_with: Sequence[str] = (), out: Path | None = None) -> Accelerator:
    """The run's Accelerator. Launched as several processes (torchrun, accelerate launch) on a machine without
    CUDA, accelerate must be told to use CPU processes (gloo); otherwise each process would train alone.

    ``log_with`` names the recipe's experiment trackers; those that keep files locally keep them in
    ``out/trackers``. Each stage's loop opens and closes its own run in them (``stage_trackers``)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    trackers = {"log_with": list(log_with), "project_dir": Path(out) / "trackers"} if log_with else {}
    used, why = resolve_precision(mixed_precision, gpu=torch.cuda.is_available())
    if not several:
        forget_other_precision(used)
    accelerator = Accelerator(mixed_precision=used, cpu=several and not torch.cuda.is_available(), **trackers)
    accelerator.precision_note = f"{PRECISION_NAMES[used]} ({why})"  # the machine table of metrics.json and report
    return accelerator


PRECISION_NAMES = {"no": "float32", "bf16": "bf16", "fp16": "fp16"}


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): torch's own CPU feature checks. Without it
    bf16 matmuls are emulated and several times slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.cache  # once per process, however many accelerators a run makes
def _warn_emulated_bf16() -> None:
    print(
        "warning: mixed_precision: bf16 asked, but this CPU has no native bf16 matmul (AMX or AVX512-BF16), where bf16 "
        "runs several times slower than float32: training in float32 instead",
        file=sys.stderr,
        flush=True,
    )


def resolve_precision(requested: str, *, gpu: bool) -> tuple[str, str]:
    """The precision a run trains in (``no`` = float32, ``bf16``, ``fp16``) and why, for ``mixed_precision``.

    ``auto`` (the LM recipes' default) is bf16 on a CPU with native bf16 matmul — measured on ours (bench/lm_step.py):
    the same step in ~0.6× the time, the same held-out perplexity — and float32 elsewhere; on a GPU it is float32, as
    before ``auto`` existed. ``bf16`` on a CPU without native bf16 falls back to float32 with one warning line: emulated
    bf16 would be a silent several-fold slowdown."""
    if gpu:
        return ("no", "auto: float32 on a GPU; set bf16 to choose it") if requested == "auto" else (requested, "recipe")
    native = native_bf16()
    if requested == "auto":
        if native:
            return "bf16", "auto: this CPU has native bf16 matmul (AMX or AVX512-BF16)"
        return "no", "auto: this CPU has no native bf16 matmul"
    if requested == "bf16" and not native:
        _warn_emulated_bf16()
        return "no", "bf16 asked; this CPU has no native bf16 matmul"
    return requested, "recipe"


def forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one state per process and refuses an Accelerator of another mixed precision ("AcceleratorState
    has already been initialized"). In one process — a notebook or a sweep calling ``run_recipe`` with bf16 after
    no — nothing of the earlier run's state is needed any more: it is dropped so the next one takes its own precision.
    Under several processes the state holds the process group and stays."""
    from accelerate.state import AcceleratorState

    held = AcceleratorState._shared_state.get("_mixed_precision")
    if held is not None and held != mixed_precision and not torch.distributed.is_initialized():
        AcceleratorState._reset_state()


@contextmanager
def stage_trackers(accelerator: Accelerator, run_dir: Path, stage: str, spec: TrainSpec) -> Iterator[None]:
    """The recipe's trackers (``make_accelerator(log_with=...)``) open for one stage: a run in the project named after
    the run folder, configured with the stage's training settings, closed when the stage ends or fails.

    The trackers are finished by hand rather than by ``accelerator.end_training()``: that also destroys the process
    group, which the next stage of a multi-process run still needs."""
    if not accelerator.log_with:
        yield
        return
    config = {"stage": stage} | {
        f"train.{key}": value for key, value in spec.model_dump(mode="json").items() if value is not None
    }  # flat scalars: TensorBoard's hparams take nothing else
    names = {"mlflow": {"run_name": stage}, "trackio": {"name": stage}}
    accelerator.init_trackers(Path(run_dir).resolve().name, config=config, init_kwargs=names)
    try:
        yield
    finally:
        for tracker in accelerator.trackers:  # none on the other processes: only the main one logs
            tracker.finish()
        accelerator.trackers = []  # init_trackers appends: the next stage must not log to these closed ones


def tracker_values(entry: dict) -> dict[str, float]:
    """A log.jsonl entry as tracker scalars, named by stage: ``student/loss``, ``student/validation/accuracy``.
    Flags (best, stopped) and the step (the trackers' x axis) are left out."""
    stage, values = entry["stage"], {}
    for key, value in entry.items():
        if isinstance(value, dict):
            values |= {f"{stage}/{key}/{k}": v for k, v in value.items() if _is_number(v)}
        elif key != "step" and _is_number(value):
            values[f"{stage}/{key}"] = value
    return values


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def progress_info(terms: dict[str, float] | None, validation: dict[str, float] | None, select_by: str) -> str:
    """The progress bar's words: the last logged loss terms (``loss 0.41 kd 0.30 ce 0.11``) and the last
    validation's ``select_by`` metric (``val accuracy 0.912``)."""
    parts = [f"{key} {value:.4g}" for key, value in (terms or {}).items()]
    if validation and select_by in validation:
        parts.append(f"val {select_by} {validation[select_by]:.4g}")
    return "  ".join(parts)


Validator = Callable[[nn.Module], dict[str, float]]  # the model → its metrics on the validation split
LOWER_IS_BETTER = {"loss": True, "kl": True, "accuracy": False, "agreement": False}


@dataclass
class Stage:
    """One model to train: hard labels only when ``teacher`` is None, else distillation."""

    name: str
    model: nn.Module
    train: TrainSpec
    teacher: TeacherSignal | None = None
    distill: DistillSpec | None = None


def jitter(x: torch.Tensor, shape: tuple[int, ...], max_shift: int) -> torch.Tensor:
    """Shift each image by a random whole number of pixels in [-max_shift, max_shift], zero-filled."""
    channels, height, width = shape
    images = F.pad(x.view(-1, channels, height, width), (max_shift,) * 4)
    n = images.shape[0]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1))
    rows = (torch.arange(height) + dy)[:, :, None]
    cols = (torch.arange(width) + dx)[:, None, :]
    batch = torch.arange(n)[:, None, None]
    shifted = images.permute(0, 2, 3, 1)[batch, rows, cols]  # [n, H, W, C]
    return shifted.permute(0, 3, 1, 2).reshape(n, -1)


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    # fused: one kernel over all parameters instead of a loop of small ops — 5× faster on our CPUs (0.16 → 0.03 s a step
    # for a 6-layer SmolLM2-shaped student), where the loop was ~15 % of a bf16 step (bench/lm_step.py)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, fused=True)


def make_schedule(optimizer, spec: TrainSpec, total_steps: int):
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "constant":
            return 1.0
        progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stage_loss(stage: Stage, logits: torch.Tensor, labels: torch.Tensor, targets) -> dict[str, torch.Tensor]:
    """Cross-entropy on hard labels for a stage without distillation settings, else the soft/hard mix."""
    if stage.distill is None:
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return {"loss": loss, "ce": loss.detach()}
    d = stage.distill
    return distillation_loss(
        logits,
        targets,
        labels,
        divergence_name=d.loss,
        temperature=d.temperature,
        alpha=d.alpha,
        t2_scaling=d.t2_scaling,
        **d.divergence_kwargs(),
    )


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def remove_checkpoints(folder: Path) -> None:
    """A finished stage's weights are saved: its checkpoints are no longer needed."""
    for path in (folder / "checkpoint.pt", previous_checkpoint(folder / "checkpoint.pt"), folder / "best.pt"):
        path.unlink(missing_ok=True)


def _rng_state() -> dict:
    """The RNG streams training draws from (dropout, jitter, sampling). CUDA's only once the run has used CUDA:
    asking earlier would start it for nothing. numpy and ``random`` are not drawn from in the loop."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    """Put back the RNG streams of a checkpoint, so a resumed run reaches the uninterrupted run's weights.
    Checkpoints written before CUDA's streams were saved have none."""
    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng")
    if cuda is None:
        return
    if torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)  # applied when CUDA starts, if it has not yet
    else:
        print(
            f"warning: the checkpoint holds the CUDA random state of {len(cuda)} device(s), this machine has "
            f"{torch.cuda.device_count()}; resuming without it (the weights will differ slightly from those of an "
            "uninterrupted run)"
        )


FULL_DISK_BYTES = 1 << 20  # less free space than this beside a failed torch.save: the disk filled up


def torch_save(obj, path: Path) -> None:
    """``torch.save`` into ``path`` (a temp file of ``atomic_path``), a full disk raised as the OSError it is: torch
    reports it as a RuntimeError ("file write failed", "unexpected pos …"), which would end the run in a traceback
    instead of one line. Other failures are raised as they are."""
    try:
        torch.save(obj, path)
        return
    except RuntimeError:
        if shutil.disk_usage(Path(path).parent).free >= FULL_DISK_BYTES:
            raise
    # Raised outside the except clause: torch's error would be its context, and its frames hold the temp file open,
    # so the space of the removed file would stay taken for as long as the error is kept.
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path).parent))


def _save_checkpoint(path: Path, model_state: dict, optimizer_state: dict, scheduler, position: dict) -> None:
    """Write the checkpoint atomically; the one it replaces is kept as the previous good one."""
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        **_rng_state(),
        "position": position,
    }
    with atomic_path(path) as tmp:
        torch_save(state, tmp)
        if path.exists():
            os.replace(path, previous_checkpoint(path))


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a cut-short file
        raise DistillError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); delete it to restart this stage"
        ) from None


def _load_checkpoint(path: Path) -> dict | None:
    """The latest readable checkpoint: ``path``, else (cut short, corrupt, or lost in a crash between two
    renames) the previous one, with a warning. None when there is neither."""
    previous = previous_checkpoint(path)
    if not path.exists():
        return _read_checkpoint(previous) if previous.exists() else None
    try:
        return _read_checkpoint(path)
    except DistillError as exc:
        if not previous.exists():
            raise
        print(f"warning: {exc}; resuming from the previous checkpoint {previous}")
        return _read_checkpoint(previous)


def _trim_log(log_path: Path, stage: str, last_step: int) -> None:
    """Drop log lines of ``stage`` after ``last_step``: they will be logged again on resume."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if entry.get("stage") != stage or entry.get("step", 0) <= last_step:
            kept.append(line)
    with atomic_path(log_path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


def nan_advice(name: str, loss: float, step: int, checkpoint: Path) -> str:
    """What to do about a non-finite loss. A lower rate is a changed recipe, which --resume refuses: a new run is
    started. The baseline and auto-sweep candidates train with the student's settings."""
    key = "teacher.train.lr" if name == "teacher" else "student.train.lr"
    kept = f"the last good checkpoint ({checkpoint}) is intact; " if checkpoint.exists() else ""
    return (
        f"{name}: loss became {loss} at step {step}; {kept}lower {key} (--set {key}=...) or check the data, then "
        "start again in a new --out (or replace this run with --force; --resume takes only the same recipe)"
    )


class Batches(Protocol):
    """What the loop trains on: ``len(weights)`` examples, each counting ``weights[i]`` in the batch mean.

    Batches of texts padded to their longest one also have ``lengths`` (tokens per example): the loop then
    draws batches of similar lengths (``length_grouped_order``). Batches with a ``set_epoch(epoch)`` method are
    told each epoch as it starts (a resumed one too), as torch's DistributedSampler is.
    """

    weights: np.ndarray  # 1 per image; the number of distilled tokens per LM block

    def loss(self, model: nn.Module, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Loss terms of examples ``rows``, each a mean over those examples' weight; ``"loss"`` is optimised."""
        ...


@dataclass
class ClassifierBatches:
    """Images and labels in memory; targets from ``teacher`` (cache or live) when distilling."""

    x: torch.Tensor
    y: torch.Tensor
    example_ids: torch.Tensor  # row → index into the teacher cache
    stage: Stage
    input_shape: tuple[int, ...]

    @property
    def weights(self) -> np.ndarray:
        return np.ones(len(self.x))

    def loss(self, model: nn.Module, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        x = self.x[rows]
        if self.stage.train.jitter:
            x = jitter(x, self.input_shape, self.stage.train.jitter)
        x, y = x.to(device), self.y[rows].to(device)
        targets = self.stage.teacher(self.example_ids[rows], x) if self.stage.teacher is not None else None
        return stage_loss(self.stage, model(x), y, targets)


def train_stage(
    stage: Stage,
    train_x: np.ndarray,
    train_y: np.ndarray,
    run_dir: Path,
    accelerator: Accelerator,
    *,
    seed: int,
    input_shape: tuple[int, ...],
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    validator: Validator | None = None,
) -> nn.Module:
    """Train a classifier ``stage.model`` in place and return it (unwrapped)."""
    # Hard labels only: unlabeled examples carry no signal. ``example_ids`` index the teacher cache.
    keep = train_y != IGNORE_INDEX if stage.teacher is None else np.ones(len(train_y), dtype=bool)
    if not keep.any():
        raise DistillError(f"{stage.name}: no training examples (no labeled ones for a hard-label stage)")
    example_ids = torch.from_numpy(np.flatnonzero(keep))
    if not keep.all():
        train_x, train_y = train_x[keep], train_y[keep]
    batches = ClassifierBatches(torch.from_numpy(train_x), torch.from_numpy(train_y), example_ids, stage, input_shape)
    return train_loop(
        stage.name,
        stage.model,
        stage.train,
        batches,
        run_dir,
        accelerator,
        seed=seed,
        resume=resume,
        on_step=on_step,
        validator=validator,
    )


def length_grouped_order(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random order whose consecutive ``batch_size`` slices hold examples of similar length, so padding to
    the longest wastes little: shuffle, sort windows of 50 batches by length, shuffle the batches. The one
    short batch stays last, where the loop expects it."""
    order = torch.randperm(len(lengths), generator=generator)
    lengths = torch.as_tensor(np.asarray(lengths))
    windows = [w[torch.argsort(lengths[w], descending=True, stable=True)] for w in order.split(50 * batch_size)]
    batches = list(torch.cat(windows).split(batch_size))
    full, short = (batches[:-1], batches[-1:]) if len(batches[-1]) < batch_size else (batches, [])
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator)]
    return torch.cat(shuffled + short)


def micro_batches(rows: torch.Tensor, rank: int, world: int, grad_accum: int) -> list[tuple[torch.Tensor, bool]]:
    """This process's micro-batches of the global batch ``rows``, each with whether it is real.

    Under several processes every rank runs exactly ``grad_accum`` of them, whatever its share: a rank that
    skipped forward/backward on a short last batch would leave the others waiting in a collective forever. An
    empty micro-batch runs a stand-in row (the batch's first) that the loop weighs 0. One process skips them.
    """
    parts = torch.tensor_split(rows[rank::world], grad_accum)
    if world == 1:
        return [(part, True) for part in parts if len(part)]
    return [(part, True) if len(part) else (rows[:1], False) for part in parts]


def epoch_order(batches: Batches, n_examples: int, batch_size: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    lengths = getattr(batches, "lengths", None)
    if lengths is None:
        return torch.randperm(n_examples, generator=generator)
    return length_grouped_order(lengths, batch_size, generator)


class BestWeights:
    """Which weights a validated stage keeps, and when it stops early: the best ``select_by`` value so far and its
    step, the validations since, and whether ``patience`` of them have passed without a better one.

    The best weights are written to ``best.pt`` as they come, durably, before any checkpoint that points to them;
    the three values go into every checkpoint's position, so a resumed run makes the same choices."""

    def __init__(self, path: Path, spec: TrainSpec, position: dict, main: bool) -> None:
        self.path, self.select_by, self.patience, self.main = path, spec.select_by, spec.patience, main
        self.best: dict | None = position.get("best")  # {"step", "value"} of the best validation
        self.stale: int = position.get("stale", 0)
        self.stopped: bool = position.get("stopped", False)

    def state(self) -> dict:
        """What a checkpoint's position holds of it."""
        return {"best": self.best, "stale": self.stale, "stopped": self.stopped}

    def offer(self, step: int, metrics: dict[str, float], model_state: Callable[[], dict]) -> bool:
        """Count the validation at ``step``; when it is the best so far, keep its weights (``model_state()``, asked
        for then only). Whether it is."""
        value, best = metrics[self.select_by], self.best
        better = best is None or (value < best["value"] if LOWER_IS_BETTER[self.select_by] else value > best["value"])
        if better:
            self.best, self.stale = {"step": step, "value": value}, 0
            state = model_state()  # under FSDP gathering the weights is a collective: every process takes part
            if self.main:
                with atomic_path(self.path) as tmp:  # durable before any checkpoint that points to it
                    torch_save(state, tmp)
        else:
            self.stale += 1
        self.stopped = bool(self.patience and self.stale >= self.patience)
        return better

    def chosen(self, trained: nn.Module, last_step: int) -> nn.Module:
        """``trained`` (the weights of ``last_step``) with the best weights loaded, when they were not the last."""
        if self.best is not None and self.best["step"] != last_step:
            trained.load_state_dict(torch.load(self.path, map_location="cpu", weights_only=True))
        return trained


def accumulate(
    model: nn.Module,
    batches: Batches,
    rows: torch.Tensor,
    weights: torch.Tensor,
    par: parallel.Parallel,
    grad_accum: int,
    nan_error: Callable[[float], str],
) -> dict[str, float]:
    """Forward and backward over this process's micro-batches of the global batch ``rows``; gradients are synced
    after the last. Each loss is weighted by its micro-batch's share of the global batch (DDP averages over the
    processes), so the gradient is the mean over every example (or token) of the global batch. The loss terms,
    weighted alike. A non-finite loss raises ``nan_error(loss)`` before its backward."""
    accelerator = par.accelerator
    world = accelerator.num_processes
    global_weight = weights[rows].sum().item()
    chunks = micro_batches(rows, accelerator.process_index, world, grad_accum)
    terms_sum: dict[str, float] = {}
    for part, (chunk, real) in enumerate(chunks):
        with par.sync(model, last=part == len(chunks) - 1):
            with accelerator.autocast():  # the loss too (an LM head's matmuls, a live teacher), not only the forward
                terms = batches.loss(model, chunk, accelerator.device)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise DistillError(nan_error(loss.item()))
            share = weights[chunk].sum().item() * world / max(global_weight, 1e-12) if real else 0.0
            accelerator.backward(loss * share)
        for key, value in terms.items():
            terms_sum[key] = terms_sum.get(key, 0.0) + value.item() * share
    return terms_sum


def progress_bar(name: str, accelerator: Accelerator) -> Progress:
    """The stage's progress bar, shown by the main process only."""
    return Progress(
        TextColumn(f"[bold]{name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
        transient=False,
    )


def record(log, entry: dict, accelerator: Accelerator) -> None:
    """One log.jsonl line (the record; a resume trims it to the checkpoint) and the same values to the trackers,
    which may see a resumed stage's steps twice."""
    if accelerator.is_main_process:
        log.write(json.dumps(entry) + "\n")
        log.flush()
    accelerator.log(tracker_values(entry), step=entry["step"])  # the main process only; no-op without trackers


def train_loop(
    name: str,
    model: nn.Module,
    spec: TrainSpec,
    batches: Batches,
    run_dir: Path,
    accelerator: Accelerator,
    *,
    seed: int,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    validator: Validator | None = None,
    validate_start: bool = False,
) -> nn.Module:
    """Train ``model`` in place on ``batches`` and return it (unwrapped).

    With a ``validator``, the model is validated every ``spec.eval_every`` steps (default: each epoch) and at the
    end; each result is logged, the weights with the best ``spec.select_by`` are kept (``RUN/<stage>/best.pt``) and
    returned, and ``spec.patience`` validations without improvement stop the stage early. The checkpoint holds the
    best value, its step and the count since, so a resumed run makes the same choices. ``validate_start``: the
    weights it starts from are validated first (step 0) and compete too — training that never beats them on the
    validation split gives them back (a teacher adapted only where it helps).
    """
    weights = torch.as_tensor(np.asarray(batches.weights, dtype=np.float64))
    n_examples = len(weights)
    steps_per_epoch = math.ceil(n_examples / spec.batch_size)
    total_steps = spec.max_steps or spec.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    checkpoint, log_path = run_dir / name / "checkpoint.pt", run_dir / "log.jsonl"
    state = _load_checkpoint(checkpoint) if resume else None
    saved = {} if state is None else state["position"]
    if state is not None:
        model.load_state_dict(state["model"])
        _restore_rng(state)
    if accelerator.is_main_process:  # what was logged after the checkpoint (a fresh start: all) is logged again
        _trim_log(log_path, name, saved.get("step", 0))
    position = {key: saved.get(key, 0) for key in ("step", "epoch", "batch")}  # the next step's place
    best = BestWeights(run_dir / name / "best.pt", spec, saved, accelerator.is_main_process)
    par = parallel.Parallel(accelerator, spec.fsdp)
    par.shard(model)  # under FSDP, before the optimizer: it is built on the sharded parameters
    optimizer = make_optimizer(model, spec)
    scheduler = make_schedule(optimizer, spec, total_steps)
    if state is not None:  # once both are built: building the scheduler sets the lr the optimizer's state replaces
        par.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    model, optimizer = par.prepare(model, optimizer)
    model.train()

    def save() -> None:
        accelerator.wait_for_everyone()
        model_state, optimizer_state = par.full_states(model, optimizer)  # under FSDP every process takes part
        if accelerator.is_main_process:
            _save_checkpoint(checkpoint, model_state, optimizer_state, scheduler, position | best.state())

    every = spec.eval_every or steps_per_epoch
    step = position["step"]
    started, seen = time.perf_counter(), 0
    progress = progress_bar(name, accelerator)
    run_dir.mkdir(parents=True, exist_ok=True)
    shown: dict = {"terms": None, "validation": None}  # what the progress bar says: the last logged values
    with progress, log_path.open("a") as log, stage_trackers(accelerator, run_dir, name, spec):
        task = progress.add_task(name, total=total_steps, completed=step, info="")
        if validator is not None and validate_start and step == 0:
            metrics = shown["validation"] = par.validate(model, validator)
            best.offer(0, metrics, functools.partial(par.full_model_state, model))
            record(log, {"stage": name, "step": 0, "validation": metrics, "best": True, "stopped": False}, accelerator)
        for epoch in range(position["epoch"], epochs):
            if best.stopped:
                break
            order = epoch_order(batches, n_examples, spec.batch_size, seed, epoch)
            if hasattr(batches, "set_epoch"):  # e.g. a teacher cache with fresh draws per epoch
                batches.set_epoch(epoch)
            first = position["batch"] if epoch == position["epoch"] else 0
            for batch in range(first, steps_per_epoch):
                if best.stopped or step == total_steps:  # early stop, or a step budget ends mid-epoch
                    break
                rows = order[batch * spec.batch_size : (batch + 1) * spec.batch_size]
                nan_error = functools.partial(nan_advice, name, step=step + 1, checkpoint=checkpoint)
                terms = accumulate(model, batches, rows, weights, par, spec.grad_accum, nan_error)
                if spec.max_grad_norm:
                    par.clip_grad_norm_(model, spec.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                seen += len(rows)
                done = batch + 1  # batches of this epoch
                position |= {"step": step, "epoch": epoch + done // steps_per_epoch, "batch": done % steps_per_epoch}
                if step % spec.log_every == 0 or step == total_steps:
                    rounded = {key: round(value, 6) for key, value in terms.items()}
                    speed = round(seen / (time.perf_counter() - started), 1)
                    entry = {"stage": name, "step": step, "epoch": round(step / steps_per_epoch, 4), **rounded}
                    record(log, entry | {"lr": scheduler.get_last_lr()[0], "examples_per_s": speed}, accelerator)
                    shown["terms"] = terms
                if validator is not None and (step % every == 0 or step == total_steps):
                    metrics = shown["validation"] = par.validate(model, validator)
                    better = best.offer(step, metrics, functools.partial(par.full_model_state, model))
                    entry = {"stage": name, "step": step, "validation": metrics, "best": better}
                    record(log, entry | {"stopped": best.stopped}, accelerator)
                progress.update(task, completed=step, info=progress_info(**shown, select_by=spec.select_by))
                if step % spec.checkpoint_every == 0 or position["batch"] == 0 or best.stopped:
                    save()
                if on_step is not None:
                    on_step(step)
    return best.chosen(par.unwrap(model), step)


def validation_summary(run_dir: Path, stage: str) -> dict | None:
    """The stage's validations as logged: the first, the best and the last, and whether it stopped early."""
    log_path = Path(run_dir) / "log.jsonl"
    if not log_path.exists():
        return None
    entries = []
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("stage") == stage and "validation" in entry:
            entries.append(entry)
    if not entries:
        return None
    best = [e for e in entries if e["best"]][-1]
    return {
        "validations": len(entries),
        "first": {"step": entries[0]["step"], **entries[0]["validation"]},
        "best": {"step": best["step"], **best["validation"]},
        "last": {"step": entries[-1]["step"], **entries[-1]["validation"]},
        "stopped_early": entries[-1]["stopped"],
        "still_improving": best is entries[-1] and len(entries) > 1,
    }
