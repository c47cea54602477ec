"""Embedding distillation (task: embedding): a student learns to reproduce the teacher's sentence embeddings.

The teacher's embeddings of the training texts are computed once and cached. Students: layers cut from the
teacher, another pretrained encoder (with a learned projection when the widths differ), or a static table of
token vectors (``distill.models.static``). With ``distill.token_states`` the student also matches the teacher's
last-layer state of every token (cached once, like the sentence vectors). A seeded random part of each source's
training texts (``data.validation_fraction``) is held out: the student never trains on it and is validated there
(its training loss and cosine to the teacher's embeddings), the best weights kept. Evaluation on the test texts:
cosine to the teacher's embeddings, linear-probe accuracy on each labeled set against the teacher's, texts/s on the
CPU.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from distill.data.labeled_text import TextData, clauses, load_text_data, validation_mask
from distill.devices import to_numpy
from distill.errors import DistillError
from distill.evaluate import embedding_validation_scores, folder_bytes, text_speed
from distill.export.run_export import CLASSIFIER_EXAMPLES, Student
from distill.io import atomic_path
from distill.losses import IGNORE_INDEX
from distill.losses.embedding import embedding_losses, token_state_loss
from distill.models import count_parameters
from distill.models.encoders import (
    SentenceEncoder,
    encode,
    load_encoder,
    load_tokenizer,
    pad,
    pad_id_of,
    padded_batch,
    save_encoder,
    student_encoder,
    tokenize,
)
from distill.models.probe import fit_probe
from distill.models.static import build_static, load_static, save_static
from distill.recipe import EmbeddingRecipe, TrainSpec, load_recipe_as
from distill.report import Quality, ReportView, human_bytes
from distill.tasks.skeleton import OnStep, Run, StageSpec, data_source, machine, quoted, run_stages
from distill.teachers.encoder_outputs import TokenStates, cached_token_states, teacher_features
from distill.teachers.identity import encoder_id
from distill.teachers.store import cache_root
from distill.train import Validator


class EmbeddingStudent(nn.Module):
    """Encoder → pooled vector → projection to the teacher's width (when they differ) → unit length if asked."""

    def __init__(self, encoder: SentenceEncoder, teacher_dim: int, normalize: bool):
        super().__init__()
        self.encoder, self.normalize = encoder, normalize
        self.projection = nn.Linear(encoder.dim, teacher_dim) if encoder.dim != teacher_dim else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_tokens: bool = False):
        """The sentence vector; with ``with_tokens``, also every token's last-layer state (projected)."""
        hidden = self.encoder.hidden(input_ids, attention_mask)
        pooled = self.encoder.pool_hidden(hidden, attention_mask)
        if self.projection is not None:
            pooled = self.projection(pooled)
        pooled = F.normalize(pooled, dim=-1) if self.normalize else pooled
        if not with_tokens:
            return pooled
        return pooled, (self.projection(hidden) if self.projection is not None else hidden)


@dataclass
class EmbeddingBatches:
    rows: list[list[int]]
    targets: torch.Tensor
    loss_name: str
    pad_id: int
    token_targets: TokenStates | None = None
    token_weight: float = 0.0

    @property
    def weights(self) -> np.ndarray:
        return np.ones(len(self.rows))

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(row) for row in self.rows])

    def loss(self, model: nn.Module, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        ids, attention = padded_batch(self.rows, rows, self.pad_id, device)
        if self.token_targets is None:
            return embedding_losses(model(ids, attention), self.targets[rows].to(device), self.loss_name)
        predicted, tokens = model(ids, attention, with_tokens=True)
        terms = embedding_losses(predicted, self.targets[rows].to(device), self.loss_name)
        token_loss = token_state_loss(tokens, self.token_targets.batch(rows, ids.shape[1]).to(device), attention)
        return terms | {"loss": terms["loss"] + self.token_weight * token_loss, "tokens": token_loss.detach()}


def save_embedding_student(model: EmbeddingStudent, tokenizer, folder: Path) -> None:
    save_encoder(model.encoder, tokenizer, folder)
    if model.projection is not None:
        state = {k: v.contiguous() for k, v in model.projection.state_dict().items()}
        with atomic_path(folder / "projection.safetensors") as tmp:  # umask's mode, not safetensors' 0600
            save_file(state, str(tmp))


def load_embedding_student(folder: Path, teacher_dim: int, normalize: bool):
    encoder, tokenizer = load_encoder(folder)
    model = EmbeddingStudent(encoder, teacher_dim, normalize)
    if model.projection is not None:
        model.projection.load_state_dict(load_file(str(folder / "projection.safetensors")))
    return model.eval(), tokenizer


def embed_texts(model: nn.Module, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    return encode(model, tokenize(tokenizer, texts, max_length), pad_id_of(tokenizer))


def embedding_validator(
    validation: tuple[list[str], np.ndarray] | None, tokenizer, max_length: int, loss_name: str
) -> Validator | None:
    """The student's loss (``loss_name``, as in training) and cosine against the teacher's embeddings of the
    validation texts; None without a validation split."""
    if validation is None:
        return None
    texts, targets = validation
    rows, pad_id, targets = tokenize(tokenizer, texts, max_length), pad_id_of(tokenizer), torch.from_numpy(targets)

    def check(model: nn.Module) -> dict[str, float]:
        return embedding_validation_scores(torch.from_numpy(encode(model, rows, pad_id)), targets, loss_name)

    return check


def probe_accuracy(train: np.ndarray, test: np.ndarray, data: TextData, seed: int) -> float:
    """Logistic regression on the labeled training embeddings, accuracy on the test embeddings."""
    labeled = data.train_labels != IGNORE_INDEX
    head, _ = fit_probe(train[labeled], data.train_labels[labeled], 1.0, seed)
    with torch.no_grad():
        predicted = to_numpy(head(torch.from_numpy(test)).argmax(-1))
    return round(float((predicted == data.test_labels).mean()), 6)


TASK = "embedding"
ONE_PROCESS = True
VALIDATED = ("student",)  # the stages whose validation the report lists
STUDENT_SEED = 1000  # recipe.seed + this: an encoder student's projection


def stages(recipe: EmbeddingRecipe) -> list[StageSpec]:
    """One stage: the student on the teacher's embeddings. A static table is built from its own seed (and trained
    with ``epochs``); an encoder student's projection is seeded, then its training."""
    if recipe.student.static is not None:
        return [StageSpec("student", "teacher", train_seed=None)]
    return [StageSpec("student", "teacher", build_seed=STUDENT_SEED)]


def _check_same_tokens(student_tok, teacher_tok, sources: list[TextData]) -> None:
    texts = [t for d in sources for t in d.train_texts]
    if tokenize(student_tok, texts, 512) != tokenize(teacher_tok, texts, 512):
        raise DistillError(
            "distill.token_states needs a student that tokenizes like the teacher (e.g. student.from_teacher); "
            "this student's tokenizer splits the texts differently — set distill.token_states: 0"
        )


@dataclass
class Setup:
    sources: list[TextData]
    names: list[str]
    held: dict[str, np.ndarray]  # per source: its validation texts
    teacher_path: Path
    teacher: SentenceEncoder
    teacher_tok: object
    student_encoder: SentenceEncoder | None = None  # an encoder student's starting weights (None: a static table)
    student_tok: object = None
    teacher_out: dict | None = None  # per source: the teacher's embeddings of its training and test texts
    kept: dict | None = None  # per source: the texts trained on
    extra: dict | None = None  # per source: clauses of them, more targets
    train_texts: list[str] | None = None
    targets: np.ndarray | None = None
    validation: tuple[list[str], np.ndarray] | None = None
    teacher_tokens: object = None  # rows → the teacher's token states (cached)


def setup(recipe: EmbeddingRecipe) -> Setup:
    sources = [load_text_data(spec, recipe.seed) for spec in recipe.data]
    names = [spec.source for spec in recipe.data]
    if len(set(names)) != len(names):
        raise DistillError("data: each source may appear once (its name labels the probe)")
    # The validation split, chosen before anything is written so that a too-small source fails first. A static
    # table without epochs is built, never trained: it has nothing to validate, so it keeps every text.
    static = recipe.student.static
    trains = static is None or static.epochs > 0
    held = {
        n: validation_mask(len(d.train_texts), s.validation_fraction if trains else 0.0, recipe.seed, n)
        for n, d, s in zip(names, sources, recipe.data, strict=True)
    }
    teacher_path = Path(recipe.teacher.path).expanduser()
    teacher, teacher_tok = load_encoder(teacher_path)
    if recipe.distill.token_states and recipe.student.path is not None:
        _check_same_tokens(load_tokenizer(Path(recipe.student.path).expanduser()), teacher_tok, sources)
    ctx = Setup(sources, names, held, teacher_path, teacher, teacher_tok)
    if static is None:
        ctx.student_encoder, ctx.student_tok = student_encoder(recipe.student, teacher, teacher_tok)
    return ctx


def teacher(ctx: Setup, run: Run, trained: None) -> list[str]:
    """The teacher's embeddings of every text (cached), and the student's training texts and targets: each source's
    training texts but its validation ones, and clauses of them."""
    recipe, names, held, teacher, teacher_tok = run.recipe, ctx.names, ctx.held, ctx.teacher, ctx.teacher_tok
    cache_dir = cache_root(recipe.distill, run.out)
    teacher_id = encoder_id(ctx.teacher_path)

    def teacher_embeddings(texts: list[str], max_length: int) -> np.ndarray:
        pooled = torch.from_numpy(teacher_features(teacher, teacher_tok, texts, max_length, cache_dir, teacher_id))
        return to_numpy(F.normalize(pooled, dim=-1) if teacher.normalize else pooled)

    ctx.teacher_out = {
        name: (teacher_embeddings(d.train_texts, s.max_length), teacher_embeddings(d.test_texts, s.max_length))
        for name, d, s in zip(names, ctx.sources, recipe.data, strict=True)
    }
    split = [(n, d.train_texts, held[n]) for n, d in zip(names, ctx.sources, strict=True)]
    ctx.kept = {n: [t for t, h in zip(texts, mask, strict=True) if not h] for n, texts, mask in split}
    ctx.extra = {  # clauses of the texts trained on (a validation text's never are): more targets, never probe examples
        n: clauses(ctx.kept[n]) if s.clauses else [] for n, s in zip(names, recipe.data, strict=True)
    }
    ctx.train_texts = [t for n in names for t in ctx.kept[n]] + [t for n in names for t in ctx.extra[n]]
    ctx.targets = np.concatenate(
        [ctx.teacher_out[n][0][~held[n]] for n in names]
        + [
            teacher_embeddings(ctx.extra[n], s.max_length)
            for n, s in zip(names, recipe.data, strict=True)
            if ctx.extra[n]
        ]
    )
    if any(h.any() for h in held.values()):
        val_texts = [t for _, texts, mask in split for t, h in zip(texts, mask, strict=True) if h]
        ctx.validation = (val_texts, np.concatenate([ctx.teacher_out[n][0][held[n]] for n in names]))

    def teacher_tokens(rows: list[list[int]]) -> TokenStates:
        return cached_token_states(teacher, rows, pad_id_of(teacher_tok), cache_dir, teacher_id)

    ctx.teacher_tokens = teacher_tokens
    return []


def prepare(ctx: Setup, run: Run, name: str, settings, spec: TrainSpec):
    """The student and its texts: a static table built from the teacher's token vectors (trained only with
    ``epochs``), or an encoder (+ projection) on the teacher's embeddings (and token states)."""
    recipe, student = run.recipe, run.recipe.student
    max_length = max(s.max_length for s in recipe.data)
    targets = torch.from_numpy(ctx.targets)
    if student.static is not None:
        static, ctx.student_tok = student.static, ctx.teacher_tok
        rows = tokenize(ctx.teacher_tok, ctx.train_texts, max_length)
        model = build_static(ctx.teacher, ctx.teacher_tok, rows, pca_dims=static.pca_dims, sif=static.sif,
                             seed=recipe.seed)  # fmt: skip
        if not static.epochs:  # without epochs there is no loop, so nothing to validate or select
            return model.eval(), None, None, None
        train = TrainSpec(epochs=static.epochs, batch_size=static.batch_size, optimizer="adamw", lr=static.lr)
        batches = EmbeddingBatches(rows, targets, "mse", pad_id_of(ctx.teacher_tok))
        return model, train, batches, embedding_validator(ctx.validation, ctx.teacher_tok, max_length, "mse")
    model = EmbeddingStudent(ctx.student_encoder, ctx.teacher.dim, ctx.teacher.normalize)
    rows = tokenize(ctx.student_tok, ctx.train_texts, max_length)
    batches = EmbeddingBatches(rows, targets, recipe.distill.loss, pad_id_of(ctx.student_tok))
    if recipe.distill.token_states:
        batches.token_targets, batches.token_weight = ctx.teacher_tokens(rows), recipe.distill.token_states
    check = embedding_validator(ctx.validation, ctx.student_tok, max_length, recipe.distill.loss)
    return model, student.train, batches, check


def load(ctx: Setup, run: Run, name: str, folder: Path) -> nn.Module:
    if run.recipe.student.static is not None:
        model, ctx.student_tok = load_static(folder)
    else:
        model, ctx.student_tok = load_embedding_student(folder, ctx.teacher.dim, ctx.teacher.normalize)
    return model


def save(ctx: Setup, run: Run, name: str, model: nn.Module, folder: Path) -> None:
    if run.recipe.student.static is not None:
        save_static(model, ctx.teacher_tok, folder)
    else:
        save_embedding_student(model, ctx.student_tok, folder)


def evaluate(ctx: Setup, run: Run, trained: dict, distill, int8) -> tuple[dict, dict]:
    recipe, names, sources, teacher = run.recipe, ctx.names, ctx.sources, ctx.teacher
    speed_texts = [t for d in sources for t in d.test_texts[: 256 // len(sources)]]
    max_length = max(s.max_length for s in recipe.data)
    speed = {"threads": recipe.eval.threads, "batch_size": recipe.eval.batch_size, "max_length": max_length}
    results = {}
    models = (("teacher", teacher, ctx.teacher_tok), ("student", trained["student"], ctx.student_tok))
    for role, model, tokenizer in models:
        scores, cosines = {}, []
        # The probes fit on every training text, the validation ones too: it only measures the embeddings, and a
        # class whose few labeled texts were all held out would be missing from it.
        for name, data, spec in zip(names, sources, recipe.data, strict=True):
            if role == "teacher":
                train_emb, test_emb = ctx.teacher_out[name]
            else:
                train_emb = embed_texts(model, tokenizer, data.train_texts, spec.max_length)
                test_emb = embed_texts(model, tokenizer, data.test_texts, spec.max_length)
            scores[f"probe_{name}"] = probe_accuracy(train_emb, test_emb, data, recipe.seed)
            if test_emb.shape[1] == teacher.dim:  # a PCA-reduced static table lives in another space
                test = torch.from_numpy(ctx.teacher_out[name][1])
                cosines.append(F.cosine_similarity(torch.from_numpy(test_emb), test))
        scores["cosine_to_teacher"] = round(float(torch.cat(cosines).mean()), 6) if cosines else None
        scores["parameters"] = count_parameters(model)
        scores["file_bytes"] = folder_bytes(ctx.teacher_path if role == "teacher" else run.out / "student")
        scores |= text_speed(model, tokenizer, speed_texts, **speed)
        results[role] = scores
    distill = recipe.distill.model_dump(mode="json") | {"student": recipe.student.model_dump(exclude={"train"})}
    sizes = {
        name: {
            "train_texts": len(ctx.kept[name]),
            "validation_texts": int(ctx.held[name].sum()),
            "clause_texts": len(ctx.extra[name]),
            "test_texts": len(d.test_texts),
            "max_length": s.max_length,
        }
        for name, d, s in zip(names, sources, recipe.data, strict=True)
    }
    return results, {"probes": names, "distill": distill, "data": sizes, "machine": machine(speed=speed)}


def starter(teacher: Path, data: Path) -> str:
    """The starting recipe ``distill init`` writes (``tasks/starter.py``)."""
    return f"""# A smaller sentence encoder that embeds like the teacher (written by distill init).
task: embedding
name: {quoted(data.name)}
data:
  - source: {data_source(data, "embedding")}
    path: {quoted(data)}
    max_length: 128
    validation_fraction: 0.1  # training texts held out: the student is validated there (loss, cosine)
teacher:
  path: {quoted(teacher)}  # a sentence-transformers / HF encoder folder
student:
  from_teacher: {{keep: 2}}
  train: {{epochs: 3, batch_size: 32, optimizer: adamw, lr: 1.0e-4}}
distill:
  loss: mse
"""


def run(
    recipe: EmbeddingRecipe, out: Path, *, resume: bool = False, force: bool = False, on_step: OnStep = None
) -> dict:
    return run_stages(sys.modules[__name__], recipe, out, resume=resume, force=force, on_step=on_step)


def load_student(run_dir: Path, fmt: str = "safetensors") -> Student:
    """The finished student and held-out texts, tokenized, to check its export on (by cosine)."""
    folder = run_dir / "student"
    recipe = load_recipe_as(EmbeddingRecipe, run_dir / "recipe.yaml")
    if recipe.student.static is not None:

        def reload(export: Path) -> nn.Module:
            return load_static(export)[0]

    else:
        teacher, _ = load_encoder(Path(recipe.teacher.path).expanduser())  # the width a projection maps to

        def reload(export: Path) -> nn.Module:
            return load_embedding_student(export, teacher.dim, teacher.normalize)[0]

    tokenizer = load_tokenizer(folder)
    texts = [t for spec in recipe.data for t in load_text_data(spec, recipe.seed).test_texts][:CLASSIFIER_EXAMPLES]
    ids, attention = pad(tokenize(tokenizer, texts, max(s.max_length for s in recipe.data)), pad_id_of(tokenizer))
    return Student(
        "sentence_encoder",
        reload(folder),
        folder,
        to_numpy(ids),
        to_numpy(attention).astype(bool),
        tokenizer=tokenizer,
        reload=reload,
    )


def export_formats(student_folder: Path) -> list[str]:
    """A transformer student also as ONNX (input_ids, attention_mask → embedding); a static table as safetensors."""
    return ["safetensors", "onnx"] if (student_folder / "config.json").is_file() else ["safetensors"]


def columns(models: dict) -> list:
    probes = [key for key in next(iter(models.values())) if key.startswith("probe_")]
    return [
        ("parameters", "params", "{:,}"),
        ("file_bytes", "file", None),
        ("cosine_to_teacher", "held-out cosine to teacher", "{:.4f}"),
        *[(key, f"probe accuracy: {key.removeprefix('probe_')}", "{:.2%}") for key in probes],
        ("latency_ms_batch1", "latency/text (batch 1)", "{:.2f} ms"),
        ("texts_per_s", "texts/s (batched)", "{:,.1f}"),
    ]


def headline(models: dict) -> str:
    t, s = models["teacher"], models["student"]
    kept = [
        f"{100 * s[key] / t[key]:.1f}% of its {key.removeprefix('probe_')} probe accuracy "
        f"({s[key]:.1%} vs {t[key]:.1%})"
        for key in t
        if key.startswith("probe_")
    ]
    return (
        f"The distilled student is {t['parameters'] / s['parameters']:.1f}× smaller "
        f"({human_bytes(s['file_bytes'])} vs {human_bytes(t['file_bytes'])}), embeds "
        f"{s['texts_per_s'] / t['texts_per_s']:.1f}× as many texts per second, "
        + (
            f"reaches a held-out cosine of {s['cosine_to_teacher']:.3f} to the teacher's embeddings "
            if s.get("cosine_to_teacher") is not None
            else ""
        )
        + "and keeps "
        + " and ".join(kept)
        + "."
    )


def note(metrics: dict) -> str:
    machine = metrics.get("machine", {})
    speed = machine.get("speed", {})
    sizes = ", ".join(
        f"{k}: {v['train_texts']} training / {v.get('validation_texts', 0)} validation / {v['test_texts']} test texts"
        for k, v in metrics.get("data", {}).items()
    )
    return (
        f"{sizes}. Probes: logistic regression on the embeddings of the training and validation texts, accuracy "
        f"on the test texts. Texts/s and latency include tokenization, {speed.get('threads', '?')} CPU thread(s), "
        f"batches of {speed.get('batch_size', '?')}, torch {machine.get('torch', '?')}."
    )


def quality(models: dict) -> Quality:
    """The first probe's accuracy."""
    probe = next(key for key in next(iter(models.values())) if key.startswith("probe_"))
    return Quality(probe, f"{probe.removeprefix('probe_')} probe accuracy (higher is better)", higher_is_better=True)


VIEW = ReportView(headline=headline, columns=columns, note=note, quality=quality)
