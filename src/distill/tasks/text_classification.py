"""Text classification by soft labels (task: text_classification).

The teacher is one of three, as the recipe says: an HF sequence-classification folder used as it is (its
``id2label`` matched to the data's classes), an encoder fine-tuned with a head on the labeled texts first (stage
``teacher``), or — cheapest — a frozen encoder with a logistic-regression probe fitted on the labeled texts. It labels
every training text (labeled or not), and its logits are cached once. The student (a smaller pretrained encoder, or
one cut from the teacher's encoder layers) is an HF sequence-classification model fine-tuned on those soft labels over
all training texts: its folder is what ``transformers.pipeline("text-classification")`` loads. The baseline is the
same student fine-tuned on the labeled part only, for the same number of steps.
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
from distill.errors import DistillError
from distill.evaluate import classifier_scores, folder_bytes, paired_loss_lead, text_speed, validation_scores
from distill.export.run_export import CLASSIFIER_EXAMPLES, Student
from distill.losses import IGNORE_INDEX
from distill.models import count_parameters
from distill.models.cut import student_from_teacher
from distill.models.encoders import (
    EncoderClassifier,
    SentenceEncoder,
    SequenceClassifier,
    classifier_from_encoder,
    encode,
    is_sequence_classifier,
    load_encoder,
    load_sequence_classifier,
    pad,
    pad_id_of,
    padded_batch,
    save_classifier_head,
    save_sequence_classifier,
    student_encoder,
    tokenize,
)
from distill.models.probe import fit_probe
from distill.recipe import DistillSpec, TextClassificationRecipe, TrainSpec, auto_settings, load_recipe_as
from distill.report import ACCURACY_COLUMNS, accuracy_view
from distill.tasks.auto import check_auto_data
from distill.tasks.checks import teacher_check
from distill.tasks.skeleton import OnStep, Run, StageSpec, comparison, data_source, machine, quoted, run_stages
from distill.teachers.encoder_outputs import cached_outputs, teacher_features
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
TEACHER_HEAD_SEED = 2000  # recipe.seed + this: the head a fine-tuned teacher starts from


def stages(recipe: TextClassificationRecipe) -> list[StageSpec]:
    """Teacher (fine-tuned, with ``teacher.train``) → baseline (fine-tuned on the labeled texts) → the teacher check
    → student (on the teacher's soft labels of every text), each student a copy of one initial student trained from
    seed + 1; a folder or probe teacher is not trained."""
    teacher = [StageSpec("teacher", "labels", train_seed=7)] if recipe.teacher.train is not None else []
    baseline = [StageSpec("baseline", "labels", auto=True, checks=("teacher",))] if recipe.baseline else []
    return [*teacher, *baseline, StageSpec("student", "teacher", auto=True, checks=("student",))]


@dataclass
class Setup:
    data: TextData
    teacher_path: Path
    teacher_kind: str  # "folder" (a sequence-classification folder as it is), "train" (fine-tuned first) or "probe"
    teacher_encoder: SentenceEncoder  # the teacher's encoder: what the probe reads and a student is cut from
    teacher_tok: object
    base_encoder: nn.Module
    student_tok: object
    teacher: nn.Module | None = None  # what labels the texts: a SequenceClassifier, or the encoder + the probe's head
    teacher_id: str | None = None  # the key of its cached logits
    probe: dict | None = None
    train_logits: np.ndarray | None = None  # the teacher's logits of every training text
    test_logits: torch.Tensor | None = None
    val_logits: torch.Tensor | None = None
    val_rows: list | None = None
    check: Validator | None = None
    base: SequenceClassifier | None = None  # the initial student: the distilled student starts from a copy of it
    alone: SequenceClassifier | None = None  # where the baseline starts: the student trained without the teacher
    rows: list | None = None  # the training texts, tokenized for the student
    steps_per_epoch: int = 0


def setup(recipe: TextClassificationRecipe) -> Setup:
    data = load_text_data(recipe.data, recipe.seed, validation=True)
    spec = recipe.teacher
    teacher_path = Path(spec.path).expanduser()
    teacher = None
    if is_sequence_classifier(teacher_path):
        if spec.probe:
            raise DistillError(
                f"teacher {teacher_path} is a classifier with its own head and labels; drop teacher.probe (it fits a "
                "head on a plain encoder), or point teacher.path at an encoder"
            )
        teacher, teacher_tok, _ = load_sequence_classifier(teacher_path, data.classes)
        teacher_encoder = SentenceEncoder(teacher.model.base_model)
        kind = "folder" if spec.train is None else "train"
    else:
        teacher_encoder, teacher_tok = load_encoder(teacher_path)
        if spec.train is None and not spec.probe:
            raise DistillError(
                f"teacher {teacher_path} is an encoder with no classification head: set teacher.train (e.g. "
                "{epochs: 3}) to fine-tune it on the labeled texts, or teacher.probe: true for a frozen-encoder probe"
            )
        kind = "train" if spec.train is not None else "probe"
    labeled = int((data.train_labels != IGNORE_INDEX).sum())
    if kind == "train" and labeled < 2 * len(data.classes):
        raise DistillError(
            f"teacher.train fine-tunes on the labeled training texts, and there are {labeled} for "
            f"{len(data.classes)} classes (fewer than 2 per class); label more texts, raise data.labeled_fraction, "
            "or use teacher.probe: true"
        )
    base_encoder, student_tok = student_encoder(recipe.student, teacher_encoder, teacher_tok)
    check_auto_data(auto_settings(recipe.distill, recipe.student.train), len(data.val_texts or []), "texts")
    return Setup(data, teacher_path, kind, teacher_encoder, teacher_tok, base_encoder, student_tok, teacher=teacher)


def teacher(ctx: Setup, run: Run, trained: SequenceClassifier | None) -> list[str]:
    """The teacher's logits of every text (cached under its id), the validation it checks and validates on, then
    the initial student, seeded."""
    recipe, data, out = run.recipe, ctx.data, run.out
    if trained is not None:
        ctx.teacher, ctx.teacher_id = trained.eval(), _classifier_id(out / "teacher", trained)
    elif ctx.teacher_kind == "folder":
        ctx.teacher_id = _classifier_id(ctx.teacher_path, ctx.teacher)
    else:
        ctx.teacher_id = encoder_id(ctx.teacher_path)  # hashed once: every feature cache is keyed by it
        ctx.train_logits = _fit_probe(ctx, run)
    if ctx.train_logits is None:  # a classifier teacher: its outputs, cached
        ctx.train_logits = _teacher_logits(ctx, run, data.train_texts)
    ctx.test_logits = torch.from_numpy(_teacher_logits(ctx, run, data.test_texts))
    max_length = recipe.data.max_length
    if data.val_texts:  # the students are validated, and the teacher checked, on held-out labeled texts
        ctx.val_logits = torch.from_numpy(_teacher_logits(ctx, run, data.val_texts))
        ctx.val_rows = tokenize(ctx.student_tok, data.val_texts, max_length)
        val_labels = torch.from_numpy(data.val_labels)

        def check(model: nn.Module) -> dict[str, float]:
            logits = torch.from_numpy(encode(model, ctx.val_rows, ctx.base.pad_id))
            return validation_scores(logits, val_labels, ctx.val_logits)

        ctx.check = check
    torch.manual_seed(recipe.seed + HEAD_SEED)  # one new head: the baseline's, and the student's unless it has one
    ctx.alone = baseline_start(ctx, recipe)
    ctx.base = initial_student(ctx, recipe)
    ctx.base.pad_id = ctx.alone.pad_id = pad_id_of(ctx.student_tok)
    ctx.rows = tokenize(ctx.student_tok, data.train_texts, max_length)
    ctx.steps_per_epoch = math.ceil(len(ctx.rows) / recipe.student.train.batch_size)
    return []


def initial_student(ctx: Setup, recipe: TextClassificationRecipe) -> SequenceClassifier:
    """What the distilled student starts from. Cut from a classifier teacher (fine-tuned here, or a folder), the
    student keeps the teacher's chosen layers *and* its pooler and head, as DistilBERT started from BERT: a new head on
    a [CLS] pooler learns slowly (Reuters R8, 2 of MiniLM-L6's layers, 138 steps: distilled 66 test errors from the
    pretrained encoder's layers, 47 from the fine-tuned teacher's, both at lr 1e-3 and T 1). Otherwise: the student
    encoder and the baseline's new head (``baseline_start``)."""
    spec = recipe.student
    if spec.from_teacher is not None and isinstance(ctx.teacher, SequenceClassifier):
        return SequenceClassifier(student_from_teacher(ctx.teacher.model, **spec.from_teacher.model_dump()),
                                  ctx.teacher.columns)  # fmt: skip
    return copy.deepcopy(ctx.alone)


def baseline_start(ctx: Setup, recipe: TextClassificationRecipe) -> SequenceClassifier:
    """Where the baseline starts: the student encoder as it is before any teacher (``student.path``'s, or the layers
    cut from the teacher's encoder as it came) and a new head, so the baseline is the student trained without the
    teacher. A fine-tuned teacher's layers and head would carry what it learned into the baseline. A classifier
    folder used as it is has no other encoder: its layers, with a new head, are the closest start."""
    return classifier_from_encoder(ctx.base_encoder.transformer, ctx.data.classes, recipe.student.dropout)


def _fit_probe(ctx: Setup, run: Run) -> np.ndarray:
    """The probe teacher: frozen encoder → pooled features (cached) → logistic regression on the labeled part; the
    training texts' logits, from the features it was fitted on."""
    recipe, data = run.recipe, ctx.data
    features = _probe_features(ctx, run, data.train_texts)
    labeled = data.train_labels != IGNORE_INDEX
    head, ctx.probe = fit_probe(features[labeled], data.train_labels[labeled], recipe.teacher.probe_c, recipe.seed)
    ctx.teacher = EncoderClassifier(ctx.teacher_encoder, len(data.classes), dropout=0.0)
    ctx.teacher.head = head
    ctx.teacher.eval()
    if not (run.out / "teacher" / "head.safetensors").exists():
        save_classifier_head(ctx.teacher, ctx.teacher_tok, run.out / "teacher", data.classes)
    with torch.no_grad():
        return to_numpy(head(torch.from_numpy(features)))


def _probe_features(ctx: Setup, run: Run, texts: list[str]) -> np.ndarray:
    return teacher_features(ctx.teacher_encoder, ctx.teacher_tok, texts, run.recipe.data.max_length,
                            cache_root(run.recipe.distill, run.out), ctx.teacher_id)  # fmt: skip


def _teacher_logits(ctx: Setup, run: Run, texts: list[str]) -> np.ndarray:
    """The teacher's logits of ``texts``: the probe's head on the cached features, or the classifier's own
    outputs, cached under its id and the token ids."""
    if ctx.teacher_kind == "probe":
        with torch.no_grad():
            return to_numpy(ctx.teacher.head(torch.from_numpy(_probe_features(ctx, run, texts))))
    rows = tokenize(ctx.teacher_tok, texts, run.recipe.data.max_length)
    return cached_outputs(ctx.teacher, rows, pad_id_of(ctx.teacher_tok), cache_root(run.recipe.distill, run.out),
                          ctx.teacher_id)  # fmt: skip


def _classifier_id(folder: Path, model: SequenceClassifier) -> str:
    """A classifier teacher's cache key: its files, and the order its labels are read in."""
    order = "" if model.columns is None else "-" + "_".join(map(str, model.columns))
    return encoder_id(folder) + order


# BERT's fine-tuning recipe: the learning rate warms up over the first 10 % of the steps. A new head on the [CLS]
# pooler, without it, went astray at the swept 1e-3 (a 2-layer MiniLM on 268 Reuters labels, 138 steps: 71 test
# errors without warmup, 40 with it).
WARMUP_SHARE = 0.1


def with_warmup(train: TrainSpec, steps: int) -> TrainSpec:
    """``train`` warming up over ``WARMUP_SHARE`` of its ``steps`` (or the recipe's warmup_steps, if longer)."""
    return train.model_copy(update={"warmup_steps": max(train.warmup_steps, round(WARMUP_SHARE * steps))})


def in_steps(ctx: Setup, train: TrainSpec) -> TrainSpec:
    """The same optimizer-step budget for both students, whatever their number of examples: epochs over all the
    training texts; warmed up over its first tenth."""
    steps = train.max_steps or train.epochs * ctx.steps_per_epoch
    return with_warmup(train.model_copy(update={"max_steps": steps}), steps)


def prepare(ctx: Setup, run: Run, name: str, settings: DistillSpec | None, spec: TrainSpec):
    """A copy of the initial student and its texts: every training text on the teacher's logits when distilled
    (``settings``), the labeled ones alone otherwise; the budget in ``max_steps``. The teacher stage: the teacher's
    classifier (its folder's, or the encoder with a new head) on the labeled texts, validated on the validation
    split's labels."""
    if name == "teacher":
        return _prepare_teacher(ctx, run, spec)
    data = ctx.data
    keep = np.ones(len(ctx.rows), dtype=bool) if settings else data.train_labels != IGNORE_INDEX
    ids = np.flatnonzero(keep)
    model = copy.deepcopy(ctx.base if settings else ctx.alone)
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


def _prepare_teacher(ctx: Setup, run: Run, spec: TrainSpec):
    recipe, data = run.recipe, ctx.data
    if ctx.teacher is not None:  # a classifier folder, fine-tuned further
        model = copy.deepcopy(ctx.teacher)
    else:
        torch.manual_seed(recipe.seed + TEACHER_HEAD_SEED)
        model = classifier_from_encoder(ctx.teacher_encoder.transformer, data.classes, dropout=0.1)
    max_length, pad_id = recipe.data.max_length, pad_id_of(ctx.teacher_tok)
    ids = np.flatnonzero(data.train_labels != IGNORE_INDEX)
    rows = tokenize(ctx.teacher_tok, [data.train_texts[i] for i in ids], max_length)
    spec = with_warmup(spec, spec.max_steps or spec.epochs * math.ceil(len(ids) / spec.batch_size))
    batches = TextBatches(rows, torch.from_numpy(data.train_labels[ids]), None, Stage("teacher", model, spec), pad_id)
    val_rows = tokenize(ctx.teacher_tok, data.val_texts, max_length)
    val_labels = torch.from_numpy(data.val_labels)

    def check(candidate: nn.Module) -> dict[str, float]:
        return validation_scores(torch.from_numpy(encode(candidate, val_rows, pad_id)), val_labels, None)

    return model.train(), spec, batches, check


def load(ctx: Setup, run: Run, name: str, folder: Path) -> nn.Module:
    return load_sequence_classifier(folder, ctx.data.classes)[0]


def save(ctx: Setup, run: Run, name: str, model: nn.Module, folder: Path) -> None:
    save_sequence_classifier(model, ctx.teacher_tok if name == "teacher" else ctx.student_tok, folder)


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
    teacher_folder = ctx.teacher_path if ctx.teacher_kind == "folder" else out / "teacher"
    results = {"teacher": _scores(ctx.teacher, ctx.test_logits, data, None, folder_bytes(teacher_folder))}
    results["teacher"] |= text_speed(ctx.teacher, ctx.teacher_tok, speed_texts, **speed)
    logits = {"teacher": ctx.test_logits}
    students = {name: (model, folder_bytes(out / name)) for name, model in trained.items() if name != "teacher"}
    if int8:
        students["student_int8"] = (int8[0], int8[1].stat().st_size)
    for name, (model, size) in students.items():
        logits[name] = torch.from_numpy(encode(model, test_rows, ctx.base.pad_id))
        results[name] = _scores(model, logits[name], data, ctx.test_logits, size)
        results[name] |= text_speed(model, ctx.student_tok, speed_texts, **speed)
    if "student_int8" in results:
        results["student_int8"]["parameters"] = results["student"]["parameters"]
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
    sections = {"machine": machine(speed=speed), "data": sizes,
                "teacher_source": {"kind": ctx.teacher_kind, "path": str(ctx.teacher_path)}}  # fmt: skip
    if ctx.probe is not None:
        sections["teacher_probe"] = ctx.probe
    sections |= comparison(logits, torch.from_numpy(data.test_labels), lambda i: {"text": data.test_texts[i][:300]},
                           list(data.classes))  # fmt: skip
    return results, sections | {"distill": distill.model_dump(mode="json")}


# distill init fine-tunes the teacher from this many labeled texts per class on average; with fewer, a frozen encoder
# with a probe (SetFit's regime: a few labels per class) is the safer start.
TRAIN_TEACHER_LABELS_PER_CLASS = 8


def starter(teacher: Path, data: Path) -> str:
    """The starting recipe ``distill init`` writes (``tasks/starter.py``): the teacher as it is when ``teacher`` is a
    sequence-classification folder; else fine-tuned when the data has enough labels per class; else a probe."""
    teacher_lines, why = _starter_teacher(teacher, data)
    return f"""# Text classification by soft labels: the teacher labels every text, a smaller encoder learns from them
# (written by distill init).
task: text_classification
name: {quoted(data.name)}
data:
  source: {data_source(data, "text_classification")}
  path: {quoted(data)}
  labeled_fraction: 1.0     # the share of labels you have; the rest is unlabeled transfer data
  validation_fraction: 0.1  # labeled texts held out: the students are validated there, the teacher checked
  max_length: 128
# {why}
teacher:
  path: {quoted(teacher)}
{teacher_lines}student:
  from_teacher: {{keep: 2}}  # the student keeps 2 of the teacher's encoder layers
  # lr auto: a short sweep (1e-4, 3e-4, 1e-3) for the baseline and, before T and alpha, for the distilled student
  train: {{epochs: 3, batch_size: 32, optimizer: adamw, lr: auto}}
distill:
  # auto: a short sweep on the validation split picks them (RUN/auto.json); numbers here skip it
  temperature: auto
  alpha: auto
"""


def _starter_teacher(teacher: Path, data: Path) -> tuple[str, str]:
    """The teacher section's lines below ``path``, and the comment that says why."""
    if is_sequence_classifier(teacher):
        return "", "teacher: a fine-tuned sequence classifier, used as it is (its id2label must name the data's labels)"
    labeled, classes = _label_counts(data)
    per_class = labeled / max(classes, 1)
    if per_class >= TRAIN_TEACHER_LABELS_PER_CLASS:
        lines = "  train: {epochs: 15, batch_size: 16, lr: 1.0e-4, patience: 3}  # best validation loss kept\n"
        return lines, (
            f"teacher: the encoder fine-tuned with a classification head on the labeled texts first ({labeled} "
            f"labels, {per_class:.0f} per class >= {TRAIN_TEACHER_LABELS_PER_CLASS}); probe: true is cheaper"
        )
    return "  probe: true  # the frozen encoder + a logistic-regression head\n", (
        f"teacher: the frozen encoder with a probe: {labeled} labels, {per_class:.1f} per class (< "
        f"{TRAIN_TEACHER_LABELS_PER_CLASS}), too few to fine-tune an encoder on; label more for teacher.train"
    )


def _label_counts(data: Path) -> tuple[int, int]:
    """(labeled training texts, classes) of the data folder ``distill init`` is given."""
    from distill.recipe import TextDataSpec

    loaded = load_text_data(TextDataSpec(source=data_source(data, "text_classification"), path=str(data)))
    return int((loaded.train_labels != IGNORE_INDEX).sum()), len(loaded.classes)


def run(
    recipe: TextClassificationRecipe, out: Path, *, resume: bool = False, force: bool = False, on_step: OnStep = None
) -> dict:
    return run_stages(sys.modules[__name__], recipe, out, resume=resume, force=force, on_step=on_step)


def _scores(model: nn.Module, logits: torch.Tensor, data: TextData, teacher_logits, file_bytes: int) -> dict:
    scores = classifier_scores(logits, torch.from_numpy(data.test_labels), teacher_logits)
    scores["parameters"] = count_parameters(model)
    scores["file_bytes"] = file_bytes
    return scores


def load_student(run_dir: Path, fmt: str = "safetensors") -> Student:
    """The finished student (an HF sequence-classification folder) and held-out texts, tokenized, to check its
    export on."""
    folder = run_dir / "student"
    recipe = load_recipe_as(TextClassificationRecipe, run_dir / "recipe.yaml")
    model, tokenizer, _ = load_sequence_classifier(folder)
    texts = load_text_data(recipe.data, recipe.seed).test_texts[:CLASSIFIER_EXAMPLES]
    ids, attention = pad(tokenize(tokenizer, texts, recipe.data.max_length), pad_id_of(tokenizer))
    return Student(
        "text_classifier",
        model,
        folder,
        to_numpy(ids),
        to_numpy(attention).astype(bool),
        tokenizer=tokenizer,
        reload=lambda export: load_sequence_classifier(export)[0],
    )


def export_formats(student_folder: Path) -> list[str]:
    return ["safetensors", "int8", "onnx", "onnx-int8"]


TEXT_COLUMNS = [  # the classifier columns; latency and throughput measured on texts, tokenization included
    *ACCURACY_COLUMNS[:6],
    ("latency_ms_batch1", "latency/text (batch 1)", "{:.1f} ms"),
    ("texts_per_s", "texts/s (batched)", "{:,.1f}"),
]
TEACHER_KINDS = {
    "folder": "the fine-tuned sequence classifier {path}, as it came",
    "train": "{path} fine-tuned with a classification head on the labeled texts (best validation loss kept)",
    "probe": "the frozen encoder {path} + a logistic-regression head{probe}",
}


def note(metrics: dict) -> str:
    machine, data = metrics.get("machine", {}), metrics.get("data", {})
    speed = machine.get("speed", {})
    teacher, probe = metrics.get("teacher_source", {}), metrics.get("teacher_probe", {})
    chosen = f" (chosen by {probe['chosen_by']})" if "chosen_by" in probe else ""
    kind = TEACHER_KINDS.get(teacher.get("kind", "probe"), TEACHER_KINDS["probe"])
    said = kind.format(path=Path(teacher.get("path", "")).name or "?", probe=f", C {probe.get('c', '?')}{chosen}")
    return (
        f"Teacher: {said}. "
        f"{data.get('test_texts', '?')} test texts, {data.get('train_texts', '?')} training texts of which "
        f"{data.get('labeled_train_texts', '?')} labeled; at most {data.get('max_length', '?')} tokens per text. "
        f"Latency and texts/s include tokenization, {speed.get('threads', '?')} CPU thread(s), batches of "
        f"{speed.get('batch_size', '?')}, torch {machine.get('torch', '?')}. File size: the weights on disk."
    )


VIEW = accuracy_view(TEXT_COLUMNS, note)
