"""Embedding distillation (task: embedding): a student learns to reproduce the teacher's sentence embeddings.

The teacher's embeddings of the training texts are computed once and cached. Students: layers cut from the
teacher, another pretrained encoder (with a learned projection when the widths differ), or a static table of
token vectors (``distill.models.static``). With ``distill.token_states`` the student also matches the teacher's
last-layer state of every token (cached once, like the sentence vectors). Evaluation on held-out texts: cosine
to the teacher's embeddings, linear-probe accuracy on each labeled set against the teacher's, texts/s on the CPU.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn

from distill.data.labeled_text import TextData, clauses, load_text_data
from distill.errors import DistillError
from distill.io import atomic_path, write_json
from distill.losses import IGNORE_INDEX
from distill.models.encoders import (
    SentenceEncoder,
    batches_by_length,
    encode,
    load_encoder,
    load_tokenizer,
    pad_id_of,
    padded_batch,
    rows_digest,
    save_encoder,
    tokenize,
)
from distill.models.static import build_static, load_static, save_static
from distill.recipe import EmbeddingRecipe, TrainSpec
from distill.report import write_report
from distill.run import prepare_run_dir
from distill.text import encoder_id, fit_probe, folder_bytes, student_encoder, teacher_features, text_speed
from distill.train import make_accelerator, remove_checkpoints, train_loop


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


def embedding_losses(predicted: torch.Tensor, target: torch.Tensor, loss: str) -> dict[str, torch.Tensor]:
    """MSE (mean over rows and dimensions, as sentence-transformers' MSELoss) and/or 1 − cosine."""
    mse = F.mse_loss(predicted.float(), target.float())
    cosine = 1.0 - F.cosine_similarity(predicted.float(), target.float(), dim=-1).mean()
    total = {"mse": mse, "cosine": cosine, "mse+cosine": mse + cosine}[loss]
    return {"loss": total, "mse": mse.detach(), "cosine": cosine.detach()}


def token_state_loss(predicted: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """MSE between unit-length token states, averaged over real tokens and dimensions: the sentence MSE's scale,
    so with a weight of 1 all of a batch's tokens together count as much as its sentence vectors."""
    squared = (F.normalize(predicted.float(), dim=-1) - F.normalize(target.float(), dim=-1)).pow(2).mean(-1)
    mask = attention_mask.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class TokenStates:
    """Every row's token states end to end (float16, one row of ``states`` per token) and where each row starts."""

    states: torch.Tensor
    offsets: torch.Tensor

    def batch(self, indices: torch.Tensor, width: int) -> torch.Tensor:
        """The rows at ``indices``, right-padded with zeros to ``width`` tokens: (batch, width, dim) float32."""
        out = torch.zeros((len(indices), width, self.states.shape[1]))
        for i, row in enumerate(indices.tolist()):
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            out[i, : end - start] = self.states[start:end].float()
        return out


@torch.inference_mode()
def token_states(encoder: SentenceEncoder, rows: list[list[int]], pad_id: int, batch_size: int = 64) -> TokenStates:
    """``encoder``'s last-layer state of every token of every row, run in batches of similar length."""
    offsets = torch.from_numpy(np.cumsum([0] + [len(r) for r in rows]))
    states = torch.empty((int(offsets[-1]), encoder.dim), dtype=torch.float16)
    encoder.eval()
    with Progress(
        TextColumn("[bold]teacher token states"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task("tokens", total=len(rows))
        for chosen, ids, attention in batches_by_length(rows, pad_id, batch_size):
            hidden = encoder.hidden(ids, attention)
            for j, row in enumerate(chosen):
                states[int(offsets[row]) : int(offsets[row + 1])] = hidden[j, : len(rows[row])]
            bar.update(task, advance=len(chosen))
    return TokenStates(states, offsets)


def cached_token_states(encoder, rows, pad_id: int, cache_dir: Path, teacher_id: str) -> TokenStates:
    """``token_states`` computed once and kept in ``cache_dir`` under the teacher and the token ids."""
    path = Path(cache_dir) / f"tokens-{teacher_id}-{rows_digest(rows)}.safetensors"
    if path.is_file():
        return TokenStates(**load_file(str(path)))
    computed = token_states(encoder, rows, pad_id)
    with atomic_path(path) as tmp:
        save_file({"states": computed.states, "offsets": computed.offsets}, str(tmp))
    return computed


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
        save_file(state, str(folder / "projection.safetensors"))


def load_embedding_student(folder: Path, teacher_dim: int, normalize: bool):
    encoder, tokenizer = load_encoder(folder)
    model = EmbeddingStudent(encoder, teacher_dim, normalize)
    if model.projection is not None:
        model.projection.load_state_dict(load_file(str(folder / "projection.safetensors")))
    return model.eval(), tokenizer


def embed_texts(model: nn.Module, tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    return encode(model, tokenize(tokenizer, texts, max_length), pad_id_of(tokenizer))


def probe_accuracy(train: np.ndarray, test: np.ndarray, data: TextData, seed: int) -> float:
    """Logistic regression on the labeled training embeddings, accuracy on the test embeddings."""
    labeled = data.train_labels != IGNORE_INDEX
    head = fit_probe(train[labeled], data.train_labels[labeled], 1.0, seed)
    with torch.no_grad():
        predicted = head(torch.from_numpy(test)).argmax(-1).numpy()
    return round(float((predicted == data.test_labels).mean()), 6)


def _train_student(recipe: EmbeddingRecipe, teacher, teacher_tok, train_texts, targets, out, resume, teacher_tokens):
    folder = out / "student"
    spec = recipe.student
    if spec.static is not None:
        if resume and (folder / "static.safetensors").exists():
            return load_static(folder)
        static = spec.static
        rows = tokenize(teacher_tok, train_texts, max(s.max_length for s in recipe.data))
        model = build_static(teacher, teacher_tok, rows, pca_dims=static.pca_dims, sif=static.sif, seed=recipe.seed)
        if static.epochs:
            train = TrainSpec(epochs=static.epochs, batch_size=static.batch_size, optimizer="adamw", lr=static.lr)
            batches = EmbeddingBatches(rows, torch.from_numpy(targets), "mse", pad_id_of(teacher_tok))
            model = train_loop("student", model, train, batches, out, make_accelerator("no"), seed=recipe.seed).eval()
        save_static(model, teacher_tok, folder)
        remove_checkpoints(folder)
        return model, teacher_tok
    if resume and (folder / "config.json").exists():
        return load_embedding_student(folder, teacher.dim, teacher.normalize)
    encoder, tokenizer = student_encoder(spec, teacher, teacher_tok)
    torch.manual_seed(recipe.seed + 1000)
    model = EmbeddingStudent(encoder, teacher.dim, teacher.normalize)
    rows = tokenize(tokenizer, train_texts, max(s.max_length for s in recipe.data))
    batches = EmbeddingBatches(rows, torch.from_numpy(targets), recipe.distill.loss, pad_id_of(tokenizer))
    if recipe.distill.token_states:
        batches.token_targets, batches.token_weight = teacher_tokens(rows), recipe.distill.token_states
    accelerator = make_accelerator("no")
    torch.manual_seed(recipe.seed + 1)
    model = train_loop("student", model, spec.train, batches, out, accelerator, seed=recipe.seed, resume=resume).eval()
    save_embedding_student(model, tokenizer, folder)
    remove_checkpoints(folder)
    return model, tokenizer


def _check_same_tokens(student_tok, teacher_tok, sources: list[TextData]) -> None:
    texts = [t for d in sources for t in d.train_texts]
    if tokenize(student_tok, texts, 512) != tokenize(teacher_tok, texts, 512):
        raise DistillError(
            "distill.token_states needs a student that tokenizes like the teacher (e.g. student.from_teacher); "
            "this student's tokenizer splits the texts differently — set distill.token_states: 0"
        )


def run_embedding(recipe: EmbeddingRecipe, out: Path, *, resume: bool = False, force: bool = False) -> dict:
    out = Path(out)
    sources = [load_text_data(spec, recipe.seed) for spec in recipe.data]
    names = [spec.source for spec in recipe.data]
    if len(set(names)) != len(names):
        raise DistillError("data: each source may appear once (its name labels the probe)")
    teacher_path = Path(recipe.teacher.path).expanduser()
    teacher, teacher_tok = load_encoder(teacher_path)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DistillError("task: embedding runs in one process; launch it without torchrun")
    if recipe.distill.token_states and recipe.student.path is not None:
        _check_same_tokens(load_tokenizer(Path(recipe.student.path).expanduser()), teacher_tok, sources)
    prepare_run_dir(recipe, out, resume=resume, force=force)
    cache_dir = Path(recipe.distill.cache_dir).expanduser() if recipe.distill.cache_dir else out / "cache"
    teacher_id = encoder_id(teacher_path)

    def teacher_embeddings(texts: list[str], max_length: int) -> np.ndarray:
        pooled = torch.from_numpy(teacher_features(teacher, teacher_tok, texts, max_length, cache_dir, teacher_id))
        return (F.normalize(pooled, dim=-1) if teacher.normalize else pooled).numpy()

    teacher_out = {
        name: (teacher_embeddings(d.train_texts, s.max_length), teacher_embeddings(d.test_texts, s.max_length))
        for name, d, s in zip(names, sources, recipe.data, strict=True)
    }
    extra = {  # clauses of the training texts: more teacher targets, never probe examples
        n: clauses(d.train_texts) if s.clauses else [] for n, d, s in zip(names, sources, recipe.data, strict=True)
    }
    train_texts = [t for d in sources for t in d.train_texts] + [t for n in names for t in extra[n]]
    targets = np.concatenate(
        [teacher_out[n][0] for n in names]
        + [teacher_embeddings(extra[n], s.max_length) for n, s in zip(names, recipe.data, strict=True) if extra[n]]
    )

    def teacher_tokens(rows: list[list[int]]) -> TokenStates:
        return cached_token_states(teacher, rows, pad_id_of(teacher_tok), cache_dir, teacher_id)

    student, student_tok = _train_student(
        recipe, teacher, teacher_tok, train_texts, targets, out, resume, teacher_tokens
    )

    speed_texts = [t for d in sources for t in d.test_texts[: 256 // len(sources)]]
    max_length = max(s.max_length for s in recipe.data)
    speed = {"threads": recipe.eval.threads, "batch_size": recipe.eval.batch_size, "max_length": max_length}
    results = {}
    for role, model, tokenizer in (("teacher", teacher, teacher_tok), ("student", student, student_tok)):
        scores, cosines = {}, []
        for name, data, spec in zip(names, sources, recipe.data, strict=True):
            if role == "teacher":
                train_emb, test_emb = teacher_out[name]
            else:
                train_emb = embed_texts(model, tokenizer, data.train_texts, spec.max_length)
                test_emb = embed_texts(model, tokenizer, data.test_texts, spec.max_length)
            scores[f"probe_{name}"] = probe_accuracy(train_emb, test_emb, data, recipe.seed)
            if test_emb.shape[1] == teacher.dim:  # a PCA-reduced static table lives in another space
                cosines.append(F.cosine_similarity(torch.from_numpy(test_emb), torch.from_numpy(teacher_out[name][1])))
        scores["cosine_to_teacher"] = round(float(torch.cat(cosines).mean()), 6) if cosines else None
        scores["parameters"] = sum(p.numel() for p in model.parameters())
        scores["file_bytes"] = folder_bytes(teacher_path if role == "teacher" else out / "student")
        scores |= text_speed(model, tokenizer, speed_texts, **speed)
        results[role] = scores
    metrics = {
        "recipe": recipe.name,
        "task": "embedding",
        "models": results,
        "probes": names,
        "distill": recipe.distill.model_dump(mode="json") | {"student": recipe.student.model_dump(exclude={"train"})},
        "data": {
            name: {
                "train_texts": len(d.train_texts),
                "clause_texts": len(extra[name]),
                "test_texts": len(d.test_texts),
                "max_length": s.max_length,
            }
            for name, d, s in zip(names, sources, recipe.data, strict=True)
        },
        "machine": {"torch": torch.__version__, "platform": platform.platform(), "speed": speed},
    }
    write_json(out / "metrics.json", metrics)
    write_report(out)
    return metrics
