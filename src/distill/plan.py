"""``distill plan RECIPE``: the memory each stage of a run will need and its time per epoch, before anything runs.

Per stage, from the recipe's real models at its real shapes (weights random where the run trains them anyway):

- parameters, and the bytes of weights, gradients and optimizer state (float32; AdamW keeps two states per
  parameter, SGD with momentum one, without momentum none);
- activations: what autograd saves for backward in one forward of a micro-batch, measured with saved-tensor hooks
  on the real model (parameters excluded);
- causal LMs: the loss's vocabulary buffers, ``LOSS_BUFFERS`` float32 [positions, V] arrays if the logits were
  materialised, [chunk, V] with the chunked loss the run uses, and the full-vocabulary log-probs of a validation
  batch; after training, the int8 export's check and the evaluation, which materialise them too;
- the teacher beside the stage, and the models the process still holds from earlier stages;

and the time per epoch: one warm-up step, then a few real optimizer steps (forward, backward, clipping, step) at the
recipe's batch size, timed, times the steps of an epoch, plus its validations, each timed once.

Peak RSS of a process also holds the interpreter and its libraries: ``import_bytes`` is this process's RSS when the
plan starts (``distill plan`` has imported what ``distill run`` imports), and the process peak is that + the data +
the largest stage. Freed memory the allocator keeps is not modelled. On CUDA, each stage is compared with the
device's total memory instead.
"""

from __future__ import annotations

import contextlib
import io
import math
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.errors import DistillError
from distill.evaluate import TEACHER_MEMO_BYTES
from distill.export.run_export import LM_BLOCKS
from distill.export.smooth import CALIBRATION_BLOCKS, SCORED_BLOCKS, smoothable_layers
from distill.io import atomic_path
from distill.losses.sparse import SparseTargets
from distill.recipe import LMRecipe, TrainSpec, auto_settings
from distill.tasks import TASKS, task_of
from distill.tasks import causal_lm as lm
from distill.tasks.skeleton import Run
from distill.teachers.lm_cache import build_lm_cache, record_dtype
from distill.teachers.lm_choice import cache_sets
from distill.teachers.lm_signals import SparseSignal
from distill.train import make_accelerator, torch_save, train_loop

FLOAT = 4  # bytes: weights, gradients, optimizer states and the losses' vocabulary buffers are float32
# The chunked losses keep about 4 float32 [chunk, V] buffers live (student logits / log-probs, teacher or target
# probabilities, the gradient: losses/chunked.py); materialised logits take the same 4 over every position.
LOSS_BUFFERS = 4
# A validation batch of evaluate.lm_validation holds the model's logits, their masked copy and log-probs, then with a
# teacher its log-probs and the KL's temporaries: about 5 [positions, V] float32 at its peak, 3 without a teacher.
# evaluate.lm_metrics holds the same 5.
VALIDATION_BUFFERS = {True: 5, False: 3}
# The int8 export of an LM student: SmoothQuant scores each alpha on SCORED_BLOCKS (export/smooth.int8_kl: the float
# model's log-probs, the int8 copy's, exp, difference, product: 5 [blocks, seq, V] float32) with the float model, the
# best and the current candidate and the copy being quantised in memory (3 student copies besides the loaded one);
# without smoothing, the check (export/run_export.check_export) holds 6 units over LM_BLOCKS (two float64 arrays).
SMOOTH_BUFFERS, SMOOTH_COPIES, CHECK_BUFFERS = 5, 3, 6
# Fast steps are timed for about a second (a median of many is steadier on a shared machine); slow ones ``steps`` times.
TIMING_SECONDS, MAX_TIMED_STEPS = 1.0, 1000
CACHE_BATCH = 8  # blocks per teacher forward when the LM cache is built (teachers/lm_cache.build_lm_cache)


@dataclass
class StagePlan:
    name: str
    examples: int  # trained on per epoch (LM: blocks)
    batch_size: int
    grad_accum: int
    steps_per_epoch: int
    steps: int  # the stage's whole budget
    parameters: int = 0
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0  # saved for backward by one micro-batch's forward
    loss_buffers: int = 0  # what the run's loss holds: the chunked [chunk, V] buffers (LMs)
    loss_buffers_full: int = 0  # the same with [positions, V] logits materialised
    validation: int = 0  # a validation batch's full-vocabulary buffers (LMs)
    teacher: int = 0  # the teacher beside this stage: its weights, and its hidden states when it runs live
    resident: int = 0  # models of earlier stages (and the student's starting copy) the process still holds
    data_reload: int = 0  # the data set loaded a second time (a classifier's export checks on its test split)
    step_seconds: float | None = None  # median of the timed steps; None: not measured
    validation_seconds: float = 0.0  # one validation pass, and writing the best weights it finds
    validations_per_epoch: float = 0.0
    checkpoint_seconds: float = 0.0  # writing a checkpoint: weights and optimizer state
    checkpoints_per_epoch: float = 0.0  # at each epoch's end and every train.checkpoint_every steps
    training: bool = True  # False: a phase that trains nothing (cache build, export, evaluation)

    @property
    def peak(self) -> int:
        """A training step (gradients, optimizer, activations, loss buffers) or a validation, whichever is larger."""
        step = self.gradients + self.optimizer + self.activations + self.loss_buffers
        held = self.resident + self.teacher + self.weights + self.data_reload
        return held + max(step, self.optimizer + self.validation)

    @property
    def epoch_seconds(self) -> float | None:
        if self.step_seconds is None:
            return None
        return (
            self.step_seconds * self.steps_per_epoch
            + self.validation_seconds * self.validations_per_epoch
            + self.checkpoint_seconds * self.checkpoints_per_epoch
        )

    @property
    def seconds(self) -> float | None:
        """The whole stage: all its steps and validations."""
        return None if self.epoch_seconds is None else self.epoch_seconds * self.steps / self.steps_per_epoch

    def as_dict(self) -> dict:
        return asdict(self) | {"peak": self.peak, "epoch_seconds": self.epoch_seconds, "seconds": self.seconds}


@dataclass
class Plan:
    task: str
    device: str
    data_bytes: int
    stages: list[StagePlan]
    import_bytes: int = 0  # the process's RSS with the libraries imported, before any data or model
    cache_disk_bytes: int = 0  # the teacher cache the run writes
    cache_bytes_per_token: int | None = None  # LM caches (a classifier's holds its logits: 4 bytes per class)
    device_memory: int | None = None  # CUDA: the device's total memory
    notes: list[str] = field(default_factory=list)
    precision: str = "float32 (recipe)"  # the steps are timed in the run's precision (train.resolve_precision)

    @property
    def peak(self) -> int:
        """On the CPU the process's peak RSS (imports + data + largest stage); on CUDA the largest stage."""
        largest = max(stage.peak for stage in self.stages)
        return largest if self.device_memory else self.import_bytes + self.data_bytes + largest

    @property
    def seconds(self) -> float:
        """The timed stages, all epochs (what was not timed is not in it)."""
        return sum(stage.seconds or 0.0 for stage in self.stages)

    def fits(self) -> dict[str, bool] | None:
        return None if self.device_memory is None else {s.name: s.peak <= self.device_memory for s in self.stages}

    def as_dict(self) -> dict:
        figures = {"peak": self.peak, "seconds": self.seconds, "fits": self.fits()}
        return asdict(self) | figures | {"stages": [stage.as_dict() for stage in self.stages]}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def make_plan(recipe, *, steps: int = 3, out: Path = Path("runs/latest")) -> Plan:
    """The plan of a parsed recipe (``tasks.load_recipe``), with ``steps`` timed optimizer steps per stage.

    ``out`` is the run folder the run would write: the plan's run folder (the timed checkpoints, a cache) is a scratch
    folder beside it, so their fsyncs are timed on the run's disk (not in $TMPDIR, often RAM), and removed after."""
    if steps < 1:
        raise DistillError(f"--steps {steps}: time at least 1 step")
    name = task_of(recipe)
    if TASKS[name].module is None:
        raise DistillError(f"distill plan covers the tasks distill run trains, not task: {name}")
    import_bytes = current_rss()  # before this plan loads any data or model
    # what the stages print (a cache's progress, a warning) goes to stderr: stdout is the table or the JSON
    with tempfile.TemporaryDirectory(dir=run_disk(out), prefix=".distill-plan-") as scratch:
        with contextlib.redirect_stdout(sys.stderr):
            plan = walk_stages(TASKS[name].module, recipe, steps, Path(scratch))
    plan.import_bytes = import_bytes
    if torch.cuda.is_available():
        plan.device_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return plan


def run_disk(out: Path) -> Path:
    """The nearest existing folder above the run folder ``out``: where the run's files will be (``runs/latest``
    before ``runs/`` exists: the current folder). Nothing is created for the plan."""
    folder = Path(out).absolute().parent
    while not folder.is_dir():
        folder = folder.parent
    return folder


# ---- what every training stage has ----


def state_bytes(model: nn.Module, spec: TrainSpec) -> dict:
    """Parameters, and the float32 bytes of weights, gradients and optimizer state."""
    parameters = sum(p.numel() for p in model.parameters())  # a tied head is one parameter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states = optimizer_states(spec)
    return {
        "parameters": parameters,
        "weights": parameters * FLOAT,
        "gradients": trainable * FLOAT,
        "optimizer": trainable * FLOAT * states,
    }


def optimizer_states(spec: TrainSpec) -> int:
    """Float32 states per parameter: AdamW two moments, SGD one momentum buffer (none at momentum 0)."""
    return 2 if spec.optimizer == "adamw" else int(spec.momentum > 0)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters in their own dtype (a bfloat16 teacher: 2 per parameter)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def saved_bytes(forward, model: nn.Module, *, inside: bool = False) -> int:
    """Bytes autograd saves for backward while ``forward()`` runs: unique storages, the parameters excluded; with
    ``inside``, only what ``model``'s own forward saves (a stage's loss runs it among other things)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    counting = [not inside]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if counting[0] and storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = []
    if inside:
        hooks.append(model.register_forward_pre_hook(lambda module, args: counting.__setitem__(0, True)))
        hooks.append(model.register_forward_hook(lambda module, args, output: counting.__setitem__(0, False)))
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(saved.values())


class _Timed(Exception):
    """Raised from the loop's on_step hook once enough steps are timed: the rest of the run is not needed."""


def timed_steps(name: str, model: nn.Module, spec: TrainSpec, batches, accelerator, steps: int, scratch: Path) -> dict:
    """Seconds of an optimizer step in the run's own loop (``train.train_loop`` in a folder in ``scratch``, its
    progress bar silenced): the median gap between consecutive steps after the first (one-time set-up), ``steps`` of
    them, more while they fit in ``TIMING_SECONDS``. Then the seconds of writing a checkpoint (weights and optimizer
    state) and a best-weights file, as the loop writes them (atomically, fsynced, on the run's disk)."""
    budget = {"max_steps": MAX_TIMED_STEPS + 1, "checkpoint_every": 10**9, "eval_every": None, "patience": None}
    if spec.lr == "auto":  # left to a sweep; any rate costs the same
        budget["lr"] = 1e-3
    stamps: list[float] = []

    def stamp(step: int) -> None:
        stamps.append(time.perf_counter())
        timed = len(stamps) - 1
        if timed >= MAX_TIMED_STEPS or (timed >= steps and stamps[-1] - stamps[0] >= TIMING_SECONDS):
            raise _Timed

    with tempfile.TemporaryDirectory(dir=scratch) as folder, contextlib.redirect_stdout(io.StringIO()):
        try:
            train_loop(
                name, model, spec.model_copy(update=budget), batches, Path(folder), accelerator, seed=0, on_step=stamp
            )
        except _Timed:
            pass
        accelerator.free_memory()  # the run keeps each stage's optimizer (keep_optimizers); this process need not
        state = accelerator.unwrap_model(model).state_dict()
        # the optimizer's state has the bytes of ``state_bytes``: states per parameter, float32
        moments = [torch.zeros_like(p) for p in model.parameters() for _ in range(optimizer_states(spec))]
        checkpoint = mean_time(lambda: write(Path(folder) / "checkpoint.pt", {"model": state, "optimizer": moments}))
        best = mean_time(lambda: write(Path(folder) / "best.pt", state))
    step_seconds = float(statistics.median(np.diff(stamps)))
    return {"step_seconds": step_seconds, "checkpoint_seconds": checkpoint, "best_seconds": best}


def write(path: Path, state) -> None:
    with atomic_path(path) as tmp:
        torch_save(state, tmp)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mean_time(fn, most: int = 5) -> float:
    """Mean seconds of ``fn``, run up to ``most`` times while they fit in ``TIMING_SECONDS``: a file write's fsyncs
    wait on whatever else is writing to the disk, and the loop pays their mean, once an epoch."""
    times = [timed(fn)]
    while len(times) < most and sum(times) < TIMING_SECONDS:
        times.append(timed(fn))
    return statistics.mean(times)


def schedule(spec: TrainSpec, examples: int, validates: bool) -> dict:
    """Steps per epoch and in all, and validations per epoch, as ``train.train_loop`` counts them."""
    per_epoch = max(1, math.ceil(examples / spec.batch_size))
    return {
        "examples": examples,
        "batch_size": spec.batch_size,
        "grad_accum": spec.grad_accum,
        "steps_per_epoch": per_epoch,
        "steps": spec.max_steps or spec.epochs * per_epoch,
        "validations_per_epoch": per_epoch / (spec.eval_every or per_epoch) if validates else 0.0,
        "checkpoints_per_epoch": 1 + per_epoch / spec.checkpoint_every,
    }


# ---- the stages a task declares, walked as the run walks them ----


def walk_stages(task, recipe, steps: int, scratch: Path) -> Plan:
    """Every stage of ``task.stages(recipe)``, in the run's order: its model and batches from the task's own
    ``prepare`` (what the run trains, seeded as the run seeds it), in a scratch run folder; the teacher signal from the
    task's ``teacher`` once the teacher is there (a teacher stage's model saved first, untrained: it has the trained
    one's shapes). Then what follows training: the int8 export (and an LM's evaluation)."""
    before, high_before = current_rss(), peak_rss()
    ctx = task.setup(recipe)
    data = data_bytes(ctx)
    # Loading peaks above the arrays it leaves (the raw file, conversions): the process's high-water mark says by how
    # much only when loading set it. Otherwise the arrays are the floor: an earlier peak (imports, or pages the kernel
    # has since reclaimed, which lower the current RSS but not the mark) is not the data's.
    high = peak_rss()
    loading = max(data, high - before) if high > high_before else data
    accelerator = make_accelerator(getattr(recipe, "mixed_precision", "no"))
    run = Run(recipe, scratch / "run", False, None, accelerator)
    run.out.mkdir()
    lm_task = isinstance(ctx, lm.LMSetup)
    lm_cache = lm_task and recipe.distill.signal == "cache"
    declared = task.stages(recipe)
    if not any(stage.name == "teacher" for stage in declared):
        task.teacher(ctx, run, None)
    stages, kept = [], 0  # kept: the trained students the run holds until its evaluation
    for stage in declared:
        spec = stage.settings(recipe)
        first = not any(planned.name == "teacher cache" for planned in stages)
        if stage.signal == "teacher" and lm_cache and first:  # the teacher's pass that builds the cache, once
            stages.append(cache_stage(ctx, recipe, teacher_bytes(ctx), held(ctx, kept), accelerator, scratch))
        model, spec, batches, check = prepared(task, ctx, run, stage, spec)
        beside = teacher_bytes(ctx)
        if stage.name == "quantized":  # it reads a model live (the teacher, or a frozen copy of the student)
            reference = batches.signal.model
            beside += teacher_hidden_bytes(reference, spec, ctx.train.input_ids.shape[1])
            beside += 0 if reference is ctx.teacher else weight_bytes(reference)
        elif stage.signal == "teacher" and lm_task and (recipe.distill.signal == "live" or recipe.distill.onpolicy):
            beside += teacher_hidden_bytes(ctx.teacher, spec, ctx.train.input_ids.shape[1])
        stages.append(stage_plan(stage.name, model, spec, batches, check, ctx, recipe, steps, accelerator, scratch,
                                 teacher=beside, resident=held(ctx, kept)))  # fmt: skip
        if stage.name == "teacher":  # saved as the run saves it: the teacher signal reads it (its id, a cache)
            task.save(ctx, run, "teacher", model, run.out / "teacher")
            task.teacher(ctx, run, model)
        else:
            kept += weight_bytes(model)
    if lm_task:
        stages += after_training(ctx, recipe, teacher_bytes(ctx), held(ctx, kept))
    elif "int8" in task.export_formats(run.out / "student"):  # the export reloads the student and the data set
        student = stages[-1].weights
        export = StagePlan("int8 export", 0, 0, 1, 1, 0, teacher=teacher_bytes(ctx), data_reload=loading,
                           resident=held(ctx, kept) + student, training=False)  # fmt: skip
        stages.append(export)
    plan = Plan(task.TASK, str(accelerator.device), data, keep_optimizers(stages), precision=accelerator.precision_note)
    if lm_task:
        plan.notes.append("int8 export and evaluation: memory only, their time is not measured")
    keys = auto_settings(recipe.distill, recipe.student.train) if any(stage.auto for stage in declared) else []
    if keys:
        plan.notes.append(
            f"{', '.join(keys)}: auto sweeps train short candidate stages first; they are not in this plan"
        )
    if lm_cache:
        d = recipe.distill
        record = record_dtype(d.cache_mode, d.cache_k, ctx.vocab_size, cache_sets(recipe, len(ctx.train)))
        plan.cache_bytes_per_token, plan.cache_disk_bytes = record.itemsize, record.itemsize * ctx.train.input_ids.size
    elif hasattr(getattr(ctx, "data", None), "train_x") and recipe.distill.signal == "cache":  # a classifier's logits
        plan.cache_disk_bytes = len(ctx.data.train_x) * ctx.data.num_classes * FLOAT
    return plan


def prepared(task, ctx, run: Run, stage, spec: TrainSpec):
    """``task.prepare`` of ``stage``, seeded as the run seeds it. An LM student on a cache reads stand-in lookups of
    the cache's shape and dtype, drawn at random (the loss costs the same whatever the ids): building the whole
    cache is the run's work, its time is the ``teacher cache`` stage's. The LM stage ``quantized`` reads a model live
    whatever the signal: it is timed as it runs."""
    recipe = run.recipe
    if stage.build_seed is not None:
        torch.manual_seed(recipe.seed + stage.build_seed)
    on_cache = stage.signal == "teacher" and isinstance(ctx, lm.LMSetup) and recipe.distill.signal == "cache"
    if not on_cache or stage.name == "quantized":
        return task.prepare(ctx, run, stage.name, recipe.distill if stage.signal == "teacher" else None, spec)
    model, spec, _, check = task.prepare(ctx, run, stage.name, None, spec)
    d, seq = recipe.distill, ctx.train.input_ids.shape[1]
    signal = SparseSignal(stand_in_targets(d.cache_mode, d.cache_k, seq, ctx.vocab_size), d.temperature)
    return model, spec, lm.LMBatches(ctx.train, ctx.vocab_size, d.chunk_size, distill=d, signal=signal), check


def teacher_bytes(ctx) -> int:
    """The teacher the run holds (and, once adapted, the one it started from: the report compares both)."""
    teachers = [getattr(ctx, "teacher", None), getattr(ctx, "teacher_base", None)]
    return sum(weight_bytes(model) for model in teachers if model is not None)


def held(ctx, kept: int) -> int:
    """The models the process holds besides the stage's: the students' starting copy, and the students trained so far
    (kept for the evaluation)."""
    start = [getattr(ctx, "student_init", None), getattr(ctx, "base", None)]
    return kept + sum(weight_bytes(model) for model in start if model is not None)


def data_bytes(ctx) -> int:
    """The bytes of the arrays a task's data holds (texts: their characters)."""
    if isinstance(ctx, lm.LMSetup):
        parts = [part for part in (ctx.train, ctx.heldout, ctx.validation) if part is not None]
        return sum(a.nbytes for part in parts for a in (part.input_ids, part.labels, part.attention_mask))
    sources = getattr(ctx, "sources", None) or [ctx.data]
    total = 0
    for data in sources:
        for value in vars(data).values():
            if isinstance(value, np.ndarray):
                total += value.nbytes
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, str))
    return total


def stage_plan(name, model, spec, batches, check, ctx, recipe, steps, accelerator, scratch, *, teacher, resident):
    """One stage: its state, what autograd saves for one micro-batch of its real batches, its timed steps and
    validation (an LM's: also its vocabulary buffers)."""
    if batches is None:  # built, not trained (a static embedding table without epochs)
        return StagePlan(name, 0, 0, 1, 1, 0, **state_bytes(model, TrainSpec()), teacher=teacher, resident=resident,
                         training=False)  # fmt: skip
    model.to(accelerator.device)
    examples = len(batches.weights)
    micro = torch.arange(min(spec.batch_size // spec.grad_accum, examples))
    with accelerator.autocast():
        activations = saved_bytes(lambda: batches.loss(model, micro, accelerator.device), model, inside=True)
    times = timed_steps(name, model, spec, batches, accelerator, steps, scratch)
    best = times.pop("best_seconds")  # a validation that improves writes the best weights
    validation_seconds = timed(lambda: check(accelerator.unwrap_model(model).eval())) + best if check else 0.0
    vocabulary = lm_buffers(name, ctx, recipe, spec, check) if isinstance(ctx, lm.LMSetup) else {}
    return StagePlan(
        name=name,
        **schedule(spec, examples, check is not None),
        **state_bytes(model, spec),
        activations=activations,
        teacher=teacher,
        resident=resident,
        **times,
        validation_seconds=validation_seconds,
        **vocabulary,
    )


def lm_buffers(name, s, recipe, spec, check) -> dict:
    """A causal LM's vocabulary buffers: the chunked loss's, the same with the logits materialised, and a validation
    batch's full-vocabulary log-probs (with the teacher's memo beside the students')."""
    seq, vocab = s.train.input_ids.shape[1], s.vocab_size
    positions = (spec.batch_size // spec.grad_accum) * (seq - 1)  # every position predicts a next token
    with_teacher = name != "teacher"
    validation_batch = min(recipe.eval.batch_size, len(s.validation) if s.validation is not None else 0)
    validation = VALIDATION_BUFFERS[with_teacher] * validation_batch * (seq - 1) * vocab * FLOAT if check else 0
    return {
        "loss_buffers": LOSS_BUFFERS * min(recipe.distill.chunk_size, positions) * vocab * FLOAT,
        "loss_buffers_full": LOSS_BUFFERS * positions * vocab * FLOAT,
        "validation": validation + (teacher_memo_bytes(s, seq, vocab) if check and with_teacher else 0),
    }


def keep_optimizers(stages: list[StagePlan]) -> list[StagePlan]:
    """The run's accelerator keeps every optimizer it prepared (``Accelerator._optimizers``; ``train.train_loop`` does
    not free them), so each finished stage's optimizer state stays in memory through the stages after it."""
    kept = 0
    for stage in stages:
        stage.resident += kept
        kept += stage.optimizer
    return stages


def teacher_memo_bytes(s, seq: int, vocab: int) -> int:
    """The teacher's validation log-probs that evaluate.lm_validation keeps between validations (in host memory; the
    plan's peak does not tell host from device, so on a GPU this overcounts the device)."""
    return min(TEACHER_MEMO_BYTES, len(s.validation) * (seq - 1) * vocab * FLOAT)


def teacher_hidden_bytes(teacher: nn.Module, spec: TrainSpec, seq: int) -> int:
    """A live teacher's forward keeps every layer's hidden states until the last is taken (``last_hidden``)."""
    config = teacher.config.get_text_config()
    micro = spec.batch_size // spec.grad_accum
    element = next(teacher.parameters()).element_size()
    return (config.num_hidden_layers + 1) * micro * seq * config.hidden_size * element


def stand_in_targets(mode: str, k: int, seq: int, vocab: int):
    """A cache lookup's shape and dtype with random content: the loss costs the same whatever the ids."""

    def lookup(rows: torch.Tensor, epoch: int) -> tuple[SparseTargets, None]:
        ids = torch.randint(0, vocab, (len(rows), seq, k))
        if mode == "sampled":
            return SparseTargets(ids), None
        logp = torch.full((len(rows), seq, k), -math.log(2 * k))  # half the mass on the k tokens, half in the tail
        return SparseTargets(ids, logp, torch.full((len(rows), seq), -math.log(2))), None

    return lookup


def cache_stage(s, recipe: LMRecipe, teacher_bytes: int, resident: int, accelerator, scratch: Path) -> StagePlan:
    """The teacher's pass over the training blocks that builds the LM cache: its logits of ``CACHE_BATCH`` blocks,
    and the per-block log-probs and probabilities the draws are made from; one batch of it written, timed."""
    d, seq, blocks = recipe.distill, s.train.input_ids.shape[1], len(s.train)
    rows = s.teacher.get_output_embeddings().weight.shape[0]  # the logits cover the padded head rows too
    teacher = s.teacher.to(accelerator.device)

    @torch.no_grad()
    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        return teacher(input_ids=input_ids.to(accelerator.device)).logits.float()

    sample = s.train.input_ids[:CACHE_BATCH]
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        seconds = timed(
            lambda: build_lm_cache(
                logits,
                sample,
                Path(folder) / "cache",
                mode=d.cache_mode,
                k=d.cache_k,
                temperature=d.temperature,
                teacher_id="plan",
                data_id="plan",
                vocab_size=s.vocab_size,
                progress=False,
            )
        )
    batches = math.ceil(blocks / CACHE_BATCH)
    return StagePlan(
        name="teacher cache",
        examples=blocks,
        batch_size=CACHE_BATCH,
        grad_accum=1,
        steps_per_epoch=batches,
        steps=batches,
        parameters=sum(p.numel() for p in s.teacher.parameters()),
        loss_buffers=(len(sample) + 2) * seq * rows * FLOAT,
        teacher=teacher_bytes,
        resident=resident,
        step_seconds=seconds,
        training=False,
    )


def after_training(s, recipe: LMRecipe, teacher_bytes: int, resident: int) -> list[StagePlan]:
    """The int8 export of the student (reloaded, smoothed, checked) and the evaluation of every model on the held-out
    blocks: memory only. ``resident``: the students kept until the end (starting copy, baseline, student)."""
    seq, vocab, student = s.train.input_ids.shape[1], s.vocab_size, weight_bytes(s.student_init)
    buffers, copies = CHECK_BUFFERS * min(len(s.heldout), LM_BLOCKS) * seq * vocab * FLOAT, 1
    if smoothable_layers(s.student_init):  # smoothing first, then the same check
        calibration = s.train.input_ids[: CALIBRATION_BLOCKS + SCORED_BLOCKS]
        scored = len(calibration[CALIBRATION_BLOCKS:]) or min(len(calibration), SCORED_BLOCKS)
        buffers, copies = max(buffers, SMOOTH_BUFFERS * scored * seq * vocab * FLOAT), SMOOTH_COPIES
    export = StagePlan(
        "int8 export",
        0,
        0,
        1,
        1,
        0,
        loss_buffers=buffers,
        teacher=teacher_bytes,
        resident=resident + (1 + copies) * student,
        training=False,
    )
    batch = min(recipe.eval.batch_size, len(s.heldout))
    evaluation = StagePlan(
        "evaluation",
        len(s.heldout),
        batch,
        1,
        math.ceil(len(s.heldout) / max(batch, 1)),
        1,
        loss_buffers=VALIDATION_BUFFERS[True] * batch * (seq - 1) * vocab * FLOAT,
        teacher=teacher_bytes,
        resident=resident + student,
        training=False,
    )
    return [export, evaluation]  # the int8 student (≤ the float one) is held through the evaluation


# ---- the table ----


def size(n: int | None) -> str:
    if not n:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "not measured"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def show_plan(plan: Plan) -> None:
    """One column per stage, one row per figure; then the process's peak and the training time on one line."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"distill plan: {plan.task} on {plan.device}", title_justify="left")
    table.add_column("")
    for stage in plan.stages:
        table.add_column(stage.name, justify="right")
    fits = plan.fits()
    rows = {
        "parameters": [f"{s.parameters:,}" if s.parameters else "—" for s in plan.stages],
        "weights": [size(s.weights) for s in plan.stages],
        "gradients": [size(s.gradients) for s in plan.stages],
        "optimizer state": [size(s.optimizer) for s in plan.stages],
        "activations / micro-batch": [size(s.activations) for s in plan.stages],
        "vocab buffers, chunked": [size(s.loss_buffers) for s in plan.stages],
        "vocab buffers, unchunked": [size(s.loss_buffers_full) for s in plan.stages],
        "validation buffers": [size(s.validation) for s in plan.stages],
        "teacher beside it": [size(s.teacher) for s in plan.stages],
        "other models held": [size(s.resident) for s in plan.stages],
        "data loaded again": [size(s.data_reload) for s in plan.stages],
        "peak": [size(s.peak) for s in plan.stages],
        "fits the device": [("yes" if fits[s.name] else "[red]no[/red]") if fits else "—" for s in plan.stages],
        "s / step": [duration(s.step_seconds) if s.training else "—" for s in plan.stages],
        "s / epoch": [duration(s.epoch_seconds) if s.training else "—" for s in plan.stages],
        "epochs": [f"{s.steps / s.steps_per_epoch:g}" if s.training else "—" for s in plan.stages],
        "whole stage": [duration(s.seconds) for s in plan.stages],
    }
    for label, cells in rows.items():
        if any(cell != "—" for cell in cells):  # a classifier has no vocabulary rows; the CPU no device to fit
            table.add_row(label, *cells)
    console = Console()
    console.print(table)
    where = (
        f"the largest stage, of {size(plan.device_memory)} on the device"
        if plan.device_memory
        else f"process RSS: imports {size(plan.import_bytes)} + data {size(plan.data_bytes)} + the largest stage"
    )
    cache = f"; teacher cache on disk {size(plan.cache_disk_bytes)}" if plan.cache_disk_bytes else ""
    if plan.cache_bytes_per_token:
        cache += f" ({plan.cache_bytes_per_token} bytes/token)"
    console.print(
        f"peak {size(plan.peak)} ({where}); training {duration(plan.seconds)} in {plan.precision}{cache}",
        highlight=False,
    )
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
