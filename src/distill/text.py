"""Text classification by soft labels (task: text_classification).

The teacher is a pretrained encoder with a logistic-regression head fitted on the labeled part of the training
set; it labels every training text (labeled or not), and its logits are cached once. The student (a smaller
pretrained encoder, or one cut from the teacher's layers) is fine-tuned on those soft labels over all training
texts. The baseline is the same student fine-tuned on the labeled part only, for the same number of steps.
"""

from __future__ import annotations

import copy
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from distill.data.labeled_text import TextData, load_text_data
from distill.errors import DistillError
from distill.evaluate import classifier_scores
from distill.io import sha256_file, write_json
from distill.losses import IGNORE_INDEX
from distill.models.cut import student_from_teacher
from distill.models.encoders import (
    EncoderClassifier,
    SentenceEncoder,
    encode,
    load_encoder,
    load_encoder_classifier,
    pad,
    pad_id_of,
    padded_batch,
    rows_digest,
    save_classifier_head,
    tokenize,
)
from distill.recipe import EncoderStudentSpec, TextClassificationRecipe
from distill.report import write_report
from distill.run import prepare_run_dir
from distill.teachers.cache import build_logits_cache
from distill.train import Stage, make_accelerator, stage_loss, train_loop


def encoder_id(folder: Path) -> str:
    """Identity of a model folder for caches: the checksum of its weights."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise DistillError(f"{folder} has no weights file (*.safetensors or *.bin)")
    return sha256_file(files[0])[:16]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def cached_outputs(model: nn.Module, rows: list[list[int]], pad_id: int, cache_dir: Path, model_id: str) -> np.ndarray:
    """``model``'s output for every row, computed once and kept in ``cache_dir`` under the model and the ids."""
    digest = rows_digest(rows)

    def run_rows(indices: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(encode(model, [rows[i] for i in indices.tolist()], pad_id))

    cache = build_logits_cache(
        cache_dir / f"outputs-{model_id}-{digest}",
        run_rows,
        np.arange(len(rows)).reshape(-1, 1),
        teacher_id=model_id,
        data_id=digest,
        batch_size=256,  # the progress bar's step
    )
    return np.array(cache.logits)  # a writable copy in memory


def teacher_features(
    encoder: SentenceEncoder, tokenizer, texts: list[str], max_length: int, cache_dir: Path, teacher_id: str
):
    """Pooled, unnormalised teacher outputs for ``texts`` (what the probe head reads; embedding tasks normalise them),
    cached by teacher weights and token ids (shared by every text task)."""
    rows = tokenize(tokenizer, texts, max_length)
    pooled = SentenceEncoder(encoder.transformer, encoder.pooling, normalize=False)
    return cached_outputs(pooled, rows, pad_id_of(tokenizer), cache_dir, teacher_id)


def fit_probe(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> nn.Linear:
    """Multinomial logistic regression on standardised features, folded into one ``nn.Linear`` on the raw ones."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((x - mean) / std, y)
    weight = probe.coef_ / std
    if weight.shape[0] == 1:  # two classes: sklearn keeps one row (logit of class 1); logits [0, z] are equivalent
        weight = np.concatenate([np.zeros_like(weight), weight])
        bias = np.array([0.0, probe.intercept_[0]])
    else:
        bias = probe.intercept_
    head = nn.Linear(x.shape[1], len(weight))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias - weight @ mean))
    return head


def student_encoder(spec: EncoderStudentSpec, teacher: SentenceEncoder, teacher_tokenizer):
    """(encoder, tokenizer) of the student: a pretrained folder, or the teacher's chosen layers."""
    if spec.path is not None:
        return load_encoder(spec.path)
    cut = student_from_teacher(teacher.transformer, **spec.from_teacher.model_dump())
    return SentenceEncoder(cut, teacher.pooling, teacher.normalize), teacher_tokenizer


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


@torch.inference_mode()
def text_speed(model: nn.Module, tokenizer, texts: list[str], *, max_length: int, threads: int, batch_size: int):
    """Batch-1 latency and batched throughput, texts in → outputs, tokenization included, on the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    pad_id = pad_id_of(tokenizer)

    def run(batch: list[str]) -> None:
        ids, attention = pad(tokenize(tokenizer, batch, max_length), pad_id)
        model(ids, attention)

    try:
        model.eval()
        for text in texts[:5]:
            run([text])
        singles = []
        for text in texts[:64]:
            start = time.perf_counter()
            run([text])
            singles.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            run(texts[i : i + batch_size])
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return {
        "latency_ms_batch1": round(statistics.median(singles) * 1e3, 3),
        "texts_per_s": round(len(texts) / seconds, 1),
        "threads": threads,
    }


def _train_student(
    name, base, tokenizer, data: TextData, rows, teacher_logits, recipe, out, accelerator, steps, resume
):
    """Fine-tune a copy of ``base`` (distilled when ``teacher_logits`` is given) and save it, unless it is saved
    already."""
    folder = out / name
    if resume and (folder / "head.safetensors").exists():
        return load_encoder_classifier(folder)[0]
    spec = recipe.student.train
    keep = np.ones(len(rows), dtype=bool) if teacher_logits is not None else data.train_labels != IGNORE_INDEX
    ids = np.flatnonzero(keep)
    steps_per_epoch = math.ceil(len(ids) / spec.batch_size)
    epochs = math.ceil(steps / steps_per_epoch)  # the same optimizer-step budget for both students
    model = copy.deepcopy(base)
    torch.manual_seed(recipe.seed + 1)
    stage = Stage(name, model, spec.model_copy(update={"epochs": epochs}))
    if teacher_logits is not None:
        # The targets come from ``TextBatches``; a non-None teacher makes ``stage_loss`` distil.
        stage.teacher, stage.distill = (lambda *_: None), recipe.distill
    batches = TextBatches(
        [rows[i] for i in ids],
        torch.from_numpy(data.train_labels[ids]),
        torch.from_numpy(teacher_logits[ids]) if teacher_logits is not None else None,
        stage,
        base.pad_id,
    )
    model = train_loop(name, model, stage.train, batches, out, accelerator, seed=recipe.seed, resume=resume).eval()
    save_classifier_head(model, tokenizer, folder, data.classes)  # replaces the folder, checkpoints included
    return model


def run_text_classification(
    recipe: TextClassificationRecipe, out: Path, *, resume: bool = False, force: bool = False
) -> dict:
    out = Path(out)
    data = load_text_data(recipe.data, recipe.seed)
    teacher_path = Path(recipe.teacher.path).expanduser()
    teacher_encoder, teacher_tok = load_encoder(teacher_path)
    base_encoder, student_tok = student_encoder(recipe.student, teacher_encoder, teacher_tok)
    accelerator = make_accelerator("no")
    if accelerator.num_processes > 1:
        raise DistillError("task: text_classification runs in one process; launch it without torchrun")
    prepare_run_dir(recipe, out, resume=resume, force=force)
    cache_dir = Path(recipe.distill.cache_dir).expanduser() if recipe.distill.cache_dir else out / "cache"

    # Teacher: frozen encoder → pooled features (cached) → logistic regression on the labeled part.
    max_length = recipe.data.max_length
    teacher_id = encoder_id(teacher_path)
    train_features = teacher_features(teacher_encoder, teacher_tok, data.train_texts, max_length, cache_dir, teacher_id)
    test_features = teacher_features(teacher_encoder, teacher_tok, data.test_texts, max_length, cache_dir, teacher_id)
    labeled = data.train_labels != IGNORE_INDEX
    head = fit_probe(train_features[labeled], data.train_labels[labeled], recipe.teacher.probe_c, recipe.seed)
    teacher = EncoderClassifier(teacher_encoder, len(data.classes), dropout=0.0)
    teacher.head = head
    teacher.eval()
    with torch.no_grad():
        teacher_train_logits = head(torch.from_numpy(train_features)).numpy()
        teacher_test_logits = head(torch.from_numpy(test_features))
    if not (out / "teacher" / "head.safetensors").exists():
        save_classifier_head(teacher, teacher_tok, out / "teacher", data.classes)

    torch.manual_seed(recipe.seed + 1000)  # the same head initialisation for baseline and student
    base = EncoderClassifier(base_encoder, len(data.classes), dropout=recipe.student.dropout)
    base.pad_id = pad_id_of(student_tok)
    rows = tokenize(student_tok, data.train_texts, max_length)
    steps = recipe.student.train.epochs * math.ceil(len(rows) / recipe.student.train.batch_size)
    trained = {}
    common = {"recipe": recipe, "out": out, "accelerator": accelerator, "steps": steps, "resume": resume}
    if recipe.baseline:
        trained["baseline"] = _train_student("baseline", base, student_tok, data, rows, None, **common)
    trained["student"] = _train_student("student", base, student_tok, data, rows, teacher_train_logits, **common)
    test_rows = tokenize(student_tok, data.test_texts, max_length)
    speed_texts = data.test_texts[:128]
    speed = {"threads": recipe.eval.threads, "batch_size": recipe.eval.batch_size, "max_length": max_length}
    results = {"teacher": _scores(teacher, teacher_test_logits, data, None, out / "teacher")}
    results["teacher"] |= text_speed(teacher, teacher_tok, speed_texts, **speed)
    for name, model in trained.items():
        logits = torch.from_numpy(encode(model, test_rows, base.pad_id))
        results[name] = _scores(model, logits, data, teacher_test_logits, out / name)
        results[name] |= text_speed(model, student_tok, speed_texts, **speed)
    metrics = {
        "recipe": recipe.name,
        "task": "text_classification",
        "models": results,
        "distill": recipe.distill.model_dump(mode="json"),
        "data": {
            "source": recipe.data.source,
            "train_texts": len(data.train_texts),
            "labeled_train_texts": int(labeled.sum()),
            "test_texts": len(data.test_texts),
            "classes": len(data.classes),
            "max_length": max_length,
            "student_steps": steps,
        },
        "machine": {"torch": torch.__version__, "platform": platform.platform(), "speed": speed},
    }
    write_json(out / "metrics.json", metrics)
    write_report(out)
    return metrics


def _scores(model: nn.Module, logits: torch.Tensor, data: TextData, teacher_logits, folder: Path) -> dict:
    scores = classifier_scores(logits, torch.from_numpy(data.test_labels), teacher_logits)
    scores["parameters"] = sum(p.numel() for p in model.parameters())
    scores["file_bytes"] = folder_bytes(folder)
    return scores
