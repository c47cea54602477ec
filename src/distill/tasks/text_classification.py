"""Text classification by soft labels (task: text_classification).

The teacher is a pretrained encoder with a logistic-regression head fitted on the labeled part of the training
set; it labels every training text (labeled or not), and its logits are cached once. The student (a smaller
pretrained encoder, or one cut from the teacher's layers) is fine-tuned on those soft labels over all training
texts. The baseline is the same student fine-tuned on the labeled part only, for the same number of steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.data.labeled_text import TextData, load_text_data
from distill.devices import to_numpy
from distill.errors import DistillError
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
from distill.tasks.auto import candidate_scores, check_auto_data, choose_auto, choose_baseline_lr
from distill.tasks.checks import student_warnings, teacher_check
from distill.tasks.skeleton import (
    OnStep,
    comparison,
    finish,
    machine,
    prepare_run_dir,
    stage_step,
    train_or_load,
)
from distill.teachers.encoder_outputs import teacher_features
from distill.teachers.identity import encoder_id
from distill.teachers.store import cache_root
from distill.train import Stage, make_accelerator, stage_loss, train_loop, validation_summary


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


def train_student(
    name,
    base,
    tokenizer,
    data: TextData,
    rows,
    teacher_logits,
    recipe,
    out,
    accelerator,
    train_spec: TrainSpec,
    resume,
    on_step,
    validator=None,
    distill=None,
):
    """Fine-tune a copy of ``base`` with ``train_spec`` (its budget in ``max_steps``; distilled with ``distill``,
    default the recipe's, when ``teacher_logits`` is given) and save it, unless a resumed run finished it."""
    keep = np.ones(len(rows), dtype=bool) if teacher_logits is not None else data.train_labels != IGNORE_INDEX
    ids = np.flatnonzero(keep)

    def train() -> nn.Module:
        model = copy.deepcopy(base)
        torch.manual_seed(recipe.seed + 1)
        settings = (distill or recipe.distill) if teacher_logits is not None else None  # targets: TextBatches
        stage = Stage(name, model, train_spec, distill=settings)
        batches = TextBatches(
            [rows[i] for i in ids],
            torch.from_numpy(data.train_labels[ids]),
            torch.from_numpy(teacher_logits[ids]) if teacher_logits is not None else None,
            stage,
            base.pad_id,
        )
        step = stage_step(name, on_step)
        return train_loop(
            name,
            model,
            stage.train,
            batches,
            out,
            accelerator,
            seed=recipe.seed,
            resume=resume,
            on_step=step,
            validator=validator,
        ).eval()

    return train_or_load(
        out / name,
        resume=resume,
        load=lambda folder: load_encoder_classifier(folder)[0],
        train=train,
        save=lambda model, folder: save_classifier_head(model, tokenizer, folder, data.classes),
    )


def run(
    recipe: TextClassificationRecipe, out: Path, *, resume: bool = False, force: bool = False, on_step: OnStep = None
) -> dict:
    out = Path(out)
    data = load_text_data(recipe.data, recipe.seed, validation=True)
    teacher_path = Path(recipe.teacher.path).expanduser()
    teacher_encoder, teacher_tok = load_encoder(teacher_path)
    base_encoder, student_tok = student_encoder(recipe.student, teacher_encoder, teacher_tok)
    accelerator = make_accelerator("no", recipe.log_with, out)
    if accelerator.num_processes > 1:
        raise DistillError("task: text_classification runs in one process; launch it without torchrun")
    check_auto_data(auto_settings(recipe.distill, recipe.student.train), len(data.val_texts or []), "texts")
    prepare_run_dir(recipe, out, resume=resume, force=force)
    cache_dir = cache_root(recipe.distill, out)

    # Teacher: frozen encoder → pooled features (cached) → logistic regression on the labeled part.
    max_length = recipe.data.max_length
    teacher_id = encoder_id(teacher_path)
    train_features = teacher_features(teacher_encoder, teacher_tok, data.train_texts, max_length, cache_dir, teacher_id)
    test_features = teacher_features(teacher_encoder, teacher_tok, data.test_texts, max_length, cache_dir, teacher_id)
    labeled = data.train_labels != IGNORE_INDEX
    head, probe = fit_probe(train_features[labeled], data.train_labels[labeled], recipe.teacher.probe_c, recipe.seed)
    teacher = EncoderClassifier(teacher_encoder, len(data.classes), dropout=0.0)
    teacher.head = head
    teacher.eval()
    with torch.no_grad():
        teacher_train_logits = to_numpy(head(torch.from_numpy(train_features)))
        teacher_test_logits = head(torch.from_numpy(test_features))
    check = None
    if data.val_texts:  # the students are validated, and the teacher checked, on held-out labeled texts
        val_features = teacher_features(teacher_encoder, teacher_tok, data.val_texts, max_length, cache_dir, teacher_id)
        with torch.no_grad():
            teacher_val_logits = head(torch.from_numpy(val_features))
        val_rows = tokenize(student_tok, data.val_texts, max_length)
        val_labels = torch.from_numpy(data.val_labels)

        def check(model: nn.Module) -> dict[str, float]:
            logits = torch.from_numpy(encode(model, val_rows, base.pad_id))
            return validation_scores(logits, val_labels, teacher_val_logits)

    if not (out / "teacher" / "head.safetensors").exists():
        save_classifier_head(teacher, teacher_tok, out / "teacher", data.classes)

    torch.manual_seed(recipe.seed + 1000)  # the same head initialisation for baseline and student
    base = EncoderClassifier(base_encoder, len(data.classes), dropout=recipe.student.dropout)
    base.pad_id = pad_id_of(student_tok)
    rows = tokenize(student_tok, data.train_texts, max_length)
    steps_per_epoch = math.ceil(len(rows) / recipe.student.train.batch_size)

    def in_steps(train: TrainSpec) -> TrainSpec:
        """The same optimizer-step budget for both students, whatever their number of examples: epochs over all
        the training texts."""
        return train.model_copy(update={"max_steps": train.max_steps or train.epochs * steps_per_epoch})

    steps = in_steps(recipe.student.train).max_steps
    trained = {}
    common = {"recipe": recipe, "out": out, "accelerator": accelerator, "resume": resume, "on_step": on_step}
    common["validator"] = check

    def candidate(name: str, settings: DistillSpec | None, budget: TrainSpec) -> dict:
        logits = teacher_train_logits if settings else None
        train_student(
            name, base, student_tok, data, rows, logits, train_spec=in_steps(budget), distill=settings, **common
        )
        return candidate_scores(out, name)

    warnings, baseline_auto, lead = [], None, None
    if recipe.baseline:
        baseline_train, baseline_auto = choose_baseline_lr(recipe.distill, out, candidate, train=recipe.student.train)
        trained["baseline"] = train_student(
            "baseline", base, student_tok, data, rows, None, train_spec=in_steps(baseline_train), **common
        )
        if check is not None:
            baseline_val_logits = torch.from_numpy(encode(trained["baseline"], val_rows, base.pad_id))
            lead = paired_loss_lead(teacher_val_logits, baseline_val_logits, val_labels)
            warnings = teacher_check(lead)

    distill, student_train, auto = choose_auto(recipe.distill, out, candidate, train=recipe.student.train)
    if auto and baseline_auto:
        auto["baseline"] = baseline_auto
    trained["student"] = train_student(
        "student",
        base,
        student_tok,
        data,
        rows,
        teacher_train_logits,
        train_spec=in_steps(student_train),
        distill=distill,
        **common,
    )
    test_rows = tokenize(student_tok, data.test_texts, max_length)
    speed_texts = data.test_texts[:128]
    speed = {"threads": recipe.eval.threads, "batch_size": recipe.eval.batch_size, "max_length": max_length}
    results = {"teacher": _scores(teacher, teacher_test_logits, data, None, out / "teacher")}
    results["teacher"] |= text_speed(teacher, teacher_tok, speed_texts, **speed)
    logits = {"teacher": teacher_test_logits}
    for name, model in trained.items():
        logits[name] = torch.from_numpy(encode(model, test_rows, base.pad_id))
        results[name] = _scores(model, logits[name], data, teacher_test_logits, out / name)
        results[name] |= text_speed(model, student_tok, speed_texts, **speed)
    sizes = {
        "source": recipe.data.source,
        "train_texts": len(data.train_texts),
        "labeled_train_texts": int(labeled.sum()),
        "test_texts": len(data.test_texts),
        "classes": len(data.classes),
        "max_length": max_length,
        "student_steps": steps,
        "validation_texts": len(data.val_texts or []),
    }
    validation = {name: validation_summary(out, name) for name in trained}
    warnings += student_warnings(results, validation, teacher_weak=bool(warnings), auto=auto is not None)
    extra = {"validation": validation, "warnings": warnings, "machine": machine(speed=speed), "teacher_probe": probe}
    extra |= {"auto": auto} if auto else {}
    extra |= {"teacher_check": lead} if lead else {}
    extra |= comparison(logits, torch.from_numpy(data.test_labels), lambda i: {"text": data.test_texts[i][:300]},
                        list(data.classes))  # fmt: skip
    distill = distill.model_dump(mode="json")
    return finish(out, recipe, "text_classification", results, VIEW, distill=distill, data=sizes, **extra)


def _scores(model: nn.Module, logits: torch.Tensor, data: TextData, teacher_logits, folder: Path) -> dict:
    scores = classifier_scores(logits, torch.from_numpy(data.test_labels), teacher_logits)
    scores["parameters"] = count_parameters(model)
    scores["file_bytes"] = folder_bytes(folder)
    return scores


def load_student(run_dir: Path) -> Student:
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
