"""Text classification by soft labels (task: text_classification).

The teacher is a pretrained encoder with a logistic-regression head fitted on the labeled part of the training
set; it labels every training text (labeled or not), and its logits are cached once. The student (a smaller
pretrained encoder, or one cut from the teacher's layers) is fine-tuned on those soft labels over all training
texts. The baseline is the same student fine-tuned on the labeled part only, for the same number of steps.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.data.labeled_text import TextData, load_text_data
from distill.devices import to_numpy
from distill.evaluate import classifier_scores, folder_bytes, paired_loss_lead, text_speed, validation_scores
from distill.export.run_export import CLASSIFIER_EXAMPLES, Student
from distill.losses import IGNORE_INDEX
from distill.models import count_parameters
from distill.models.encoders import (
    EncoderClassifier,
    encode,
    load_encoder,
    load_encoder_classifier,
    pad,
    pad_id_of,
    padded_batch,
    save_classifier_head,
    student_encoder,
    tokenize,
)
from distill.models.probe import fit_probe
from distill.recipe import DistillSpec, TextClassificationRecipe, TrainSpec, auto_settings, load_recipe_as
from distill.report import ACCURACY_COLUMNS, accuracy_view
from distill.tasks.auto import check_auto_data
from distill.tasks.checks import teacher_check
from distill.tasks.skeleton import OnStep, Run, StageSpec, comparison, data_source, machine, quoted, run_stages
from distill.teachers.encoder_outputs import teacher_features
from distill.teachers.identity import encoder_id
from distill.teachers.store import cache_root
from distill.train import Stage, Validator, stage_loss


@dataclass
class TextBatches:
    """Tokenized texts; targets are the cached teacher logits of the same rows when distilling."""

    rows: list[list[int]]
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None
    stage: Stage
    pad_id: int

    @property
    def weights(self) -> np.ndarray:
        return np.ones(len(self.rows))

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(row) for row in self.rows])

    def loss(self, model: nn.Module, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        logits = model(*padded_batch(self.rows, rows, self.pad_id, device))
        targets = self.teacher_logits[rows].to(device) if self.teacher_logits is not None else None
        return stage_loss(self.stage, logits, self.labels[rows].to(device), targets)


TASK = "text_classification"
ONE_PROCESS = True
VALIDATED = ("baseline", "student")  # the stages whose validation the report lists
HEAD_SEED = 1000  # recipe.seed + this: the head both students start from


def stages(recipe: TextClassificationRecipe) -> list[StageSpec]:
    """Baseline (fine-tuned on the labeled texts) → the teacher check → student (on the teacher's soft labels of
    every text), each a copy of one initial student trained from seed + 1; the teacher is fitted, not trained."""
    baseline = [StageSpec("baseline", "labels", auto=True, checks=("teacher",))] if recipe.baseline else []
    return [*baseline, StageSpec("student", "teacher", auto=True, checks=("student",))]


@dataclass
class Setup:
    data: TextData
    teacher_path: Path
    teacher_encoder: nn.Module
    teacher_tok: object
    base_encoder: nn.Module
    student_tok: object
    teacher: EncoderClassifier | None = None  # the frozen encoder + the probe's head
    probe: dict | None = None
    train_logits: np.ndarray | None = None  # the teacher's logits of every training text
    test_logits: torch.Tensor | None = None
    val_logits: torch.Tensor | None = None
    val_rows: list | None = None
    check: Validator | None = None
    base: EncoderClassifier | None = None  # the initial student: both students start from a copy of it
    rows: list | None = None  # the training texts, tokenized for the student
    steps_per_epoch: int = 0


def setup(recipe: TextClassificationRecipe) -> Setup:
    data = load_text_data(recipe.data, recipe.seed, validation=True)
    teacher_path = Path(recipe.teacher.path).expanduser()
    teacher_encoder, teacher_tok = load_encoder(teacher_path)
    base_encoder, student_tok = student_encoder(recipe.student, teacher_encoder, teacher_tok)
    check_auto_data(auto_settings(recipe.distill, recipe.student.train), len(data.val_texts or []), "texts")
    return Setup(data, teacher_path, teacher_encoder, teacher_tok, base_encoder, student_tok)


def teacher(ctx: Setup, run: Run, trained: None) -> list[str]:
    """The teacher: frozen encoder → pooled features (cached) → logistic regression on the labeled part; its logits
    of every text. Then the initial student, seeded."""
    recipe, data, out = run.recipe, ctx.data, run.out
    cache_dir = cache_root(recipe.distill, out)
    max_length = recipe.data.max_length
    teacher_id = encoder_id(ctx.teacher_path)

    def features(texts: list[str]) -> np.ndarray:
        return teacher_features(ctx.teacher_encoder, ctx.teacher_tok, texts, max_length, cache_dir, teacher_id)

    train_features, test_features = features(data.train_texts), features(data.test_texts)
    labeled = data.train_labels != IGNORE_INDEX
    head, ctx.probe = fit_probe(
        train_features[labeled], data.train_labels[labeled], recipe.teacher.probe_c, recipe.seed
    )
    ctx.teacher = EncoderClassifier(ctx.teacher_encoder, len(data.classes), dropout=0.0)
    ctx.teacher.head = head
    ctx.teacher.eval()
    with torch.no_grad():
        ctx.train_logits = to_numpy(head(torch.from_numpy(train_features)))
        ctx.test_logits = head(torch.from_numpy(test_features))
    if data.val_texts:  # the students are validated, and the teacher checked, on held-out labeled texts
        val_features = features(data.val_texts)
        with torch.no_grad():
            ctx.val_logits = head(torch.from_numpy(val_features))
        ctx.val_rows = tokenize(ctx.student_tok, data.val_texts, max_length)
        val_labels = torch.from_numpy(data.val_labels)

        def check(model: nn.Module) -> dict[str, float]:
            logits = torch.from_numpy(encode(model, ctx.val_rows, ctx.base.pad_id))
            return validation_scores(logits, val_labels, ctx.val_logits)

        ctx.check = check
    if not (out / "teacher" / "head.safetensors").exists():
        save_classifier_head(ctx.teacher, ctx.teacher_tok, out / "teacher", data.classes)
    torch.manual_seed(recipe.seed + HEAD_SEED)  # the same head initialisation for baseline and student
    ctx.base = EncoderClassifier(ctx.base_encoder, len(data.classes), dropout=recipe.student.dropout)
    ctx.base.pad_id = pad_id_of(ctx.student_tok)
    ctx.rows = tokenize(ctx.student_tok, data.train_texts, max_length)
    ctx.steps_per_epoch = math.ceil(len(ctx.rows) / recipe.student.train.batch_size)
    return []


def in_steps(ctx: Setup, train: TrainSpec) -> TrainSpec:
    """The same optimizer-step budget for both students, whatever their number of examples: epochs over all the
    training texts."""
    return train.model_copy(update={"max_steps": train.max_steps or train.epochs * ctx.steps_per_epoch})


def prepare(ctx: Setup, run: Run, name: str, settings: DistillSpec | None, spec: TrainSpec):
    """A copy of the initial student and its texts: every training text on the teacher's logits when distilled
    (``settings``), the labeled ones alone otherwise; the budget in ``max_steps``."""
    data = ctx.data
    keep = np.ones(len(ctx.rows), dtype=bool) if settings else data.train_labels != IGNORE_INDEX
    ids = np.flatnonzero(keep)
    model = copy.deepcopy(ctx.base)
    spec = in_steps(ctx, spec)
    stage = Stage(name, model, spec, distill=settings)
    batches = TextBatches(
        [ctx.rows[i] for i in ids],
        torch.from_numpy(data.train_labels[ids]),
        torch.from_numpy(ctx.train_logits[ids]) if settings else None,
        stage,
        ctx.base.pad_id,
    )
    return model, spec, batches, ctx.check


def load(ctx: Setup, run: Run, name: str, folder: Path) -> nn.Module:
    return load_encoder_classifier(folder)[0]


def save(ctx: Setup, run: Run, name: str, model: nn.Module, folder: Path) -> None:
    save_classifier_head(model, ctx.student_tok, folder, ctx.data.classes)


def check_teacher(ctx: Setup, run: Run, baseline: nn.Module) -> tuple[list[str], dict | None]:
    if ctx.check is None:
        return [], None
    baseline_val_logits = torch.from_numpy(encode(baseline, ctx.val_rows, ctx.base.pad_id))
    lead = paired_loss_lead(ctx.val_logits, baseline_val_logits, torch.from_numpy(ctx.data.val_labels))
    return teacher_check(lead), lead


def evaluate(ctx: Setup, run: Run, trained: dict, distill: DistillSpec, int8) -> tuple[dict, dict]:
    recipe, data, out = run.recipe, ctx.data, run.out
    max_length = recipe.data.max_length
    test_rows = tokenize(ctx.student_tok, data.test_texts, max_length)
    speed_texts = data.test_texts[:128]
    speed = {"threads": recipe.eval.threads, "batch_size": recipe.eval.batch_size, "max_length": max_length}
    results = {"teacher": _scores(ctx.teacher, ctx.test_logits, data, None, out / "teacher")}
    results["teacher"] |= text_speed(ctx.teacher, ctx.teacher_tok, speed_texts, **speed)
    logits = {"teacher": ctx.test_logits}
    for name, model in trained.items():
        logits[name] = torch.from_numpy(encode(model, test_rows, ctx.base.pad_id))
        results[name] = _scores(model, logits[name], data, ctx.test_logits, out / name)
        results[name] |= text_speed(model, ctx.student_tok, speed_texts, **speed)
    sizes = {
        "source": recipe.data.source,
        "train_texts": len(data.train_texts),
        "labeled_train_texts": int((data.train_labels != IGNORE_INDEX).sum()),
        "test_texts": len(data.test_texts),
        "classes": len(data.classes),
        "max_length": max_length,
        "student_steps": in_steps(ctx, recipe.student.train).max_steps,
        "validation_texts": len(data.val_texts or []),
    }
    sections = {"machine": machine(speed=speed), "teacher_probe": ctx.probe, "data": sizes}
    sections |= comparison(logits, torch.from_numpy(data.test_labels), lambda i: {"text": data.test_texts[i][:300]},
                           list(data.classes))  # fmt: skip
    return results, sections | {"distill": distill.model_dump(mode="json")}


def starter(teacher: Path, data: Path) -> str:
    """The starting recipe ``distill init`` writes (``tasks/starter.py``)."""
    return f"""# Text classification by soft labels: a sentence-encoder teacher + a probe label the texts, a smaller
# encoder learns from them (written by distill init).
task: text_classification
name: {quoted(data.name)}
data:
  source: {data_source(data, "text_classification")}
  path: {quoted(data)}
  labeled_fraction: 1.0     # the share of labels you have; the rest is unlabeled transfer data
  validation_fraction: 0.1  # labeled texts held out: the students are validated there, the teacher checked
  max_length: 128
teacher:
  path: {quoted(teacher)}  # a sentence-transformers / HF encoder folder
student:
  from_teacher: {{keep: 2}}  # the student keeps 2 of the teacher's layers
  # lr auto: a short sweep (1e-4, 3e-4, 1e-3) for the baseline and, before T and alpha, for the distilled student
  train: {{epochs: 3, batch_size: 32, optimizer: adamw, lr: auto}}
distill:
  # auto: a short sweep on the validation split picks them (RUN/auto.json); numbers here skip it
  temperature: auto
  alpha: auto
"""


def run(
    recipe: TextClassificationRecipe, out: Path, *, resume: bool = False, force: bool = False, on_step: OnStep = None
) -> dict:
    return run_stages(sys.modules[__name__], recipe, out, resume=resume, force=force, on_step=on_step)


def _scores(model: nn.Module, logits: torch.Tensor, data: TextData, teacher_logits, folder: Path) -> dict:
    scores = classifier_scores(logits, torch.from_numpy(data.test_labels), teacher_logits)
    scores["parameters"] = count_parameters(model)
    scores["file_bytes"] = folder_bytes(folder)
    return scores


def load_student(run_dir: Path, fmt: str = "safetensors") -> Student:
    """The finished student (encoder + head) and held-out texts, tokenized, to check its export on."""
    folder = run_dir / "student"
    recipe = load_recipe_as(TextClassificationRecipe, run_dir / "recipe.yaml")
    model, tokenizer, _ = load_encoder_classifier(folder)
    texts = load_text_data(recipe.data, recipe.seed).test_texts[:CLASSIFIER_EXAMPLES]
    ids, attention = pad(tokenize(tokenizer, texts, recipe.data.max_length), pad_id_of(tokenizer))
    return Student(
        "text_classifier",
        model,
        folder,
        to_numpy(ids),
        to_numpy(attention).astype(bool),
        tokenizer=tokenizer,
        reload=lambda export: load_encoder_classifier(export)[0],
    )


def export_formats(student_folder: Path) -> list[str]:
    return ["safetensors"]


TEXT_COLUMNS = [  # the classifier columns; latency and throughput measured on texts, tokenization included
    *ACCURACY_COLUMNS[:6],
    ("latency_ms_batch1", "latency/text (batch 1)", "{:.1f} ms"),
    ("texts_per_s", "texts/s (batched)", "{:,.1f}"),
]


def note(metrics: dict) -> str:
    machine, data = metrics.get("machine", {}), metrics.get("data", {})
    speed = machine.get("speed", {})
    probe = metrics.get("teacher_probe", {})
    chosen = f" (chosen by {probe['chosen_by']})" if "chosen_by" in probe else ""
    return (
        f"Teacher: the frozen encoder + a logistic-regression head, C {probe.get('c', '?')}{chosen}. "
        f"{data.get('test_texts', '?')} test texts, {data.get('train_texts', '?')} training texts of which "
        f"{data.get('labeled_train_texts', '?')} labeled; at most {data.get('max_length', '?')} tokens per text. "
        f"Latency and texts/s include tokenization, {speed.get('threads', '?')} CPU thread(s), batches of "
        f"{speed.get('batch_size', '?')}, torch {machine.get('torch', '?')}. File size: the weights on disk."
    )


VIEW = accuracy_view(TEXT_COLUMNS, note)
