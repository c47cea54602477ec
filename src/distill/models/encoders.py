"""Text encoders (BERT/MPNet-style, sentence-transformers folders) as teachers and students.

A ``SentenceEncoder`` is a transformer plus the pooling its sentence-transformers folder declares
(``modules.json``, ``1_Pooling/config.json``); ``EncoderClassifier`` puts a linear head on the pooled output (the
frozen-encoder probe teacher); ``SequenceClassifier`` is an HF ``...ForSequenceClassification`` (fine-tuned teachers
and every student: a folder ``transformers.pipeline("text-classification")`` loads).
Texts are tokenized once into id lists; batches are padded to their own longest row, and inference sorts
texts by length so padding stays small.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from distill.devices import to_numpy
from distill.errors import DistillError
from distill.io import atomic_dir, atomic_path
from distill.models.cut import student_from_teacher

POOLING_MODES = ("mean", "cls", "max")
hf_logging.disable_progress_bar()  # loads and saves draw bars of their own; the CLI has one progress display


class SentenceEncoder(nn.Module):
    """Transformer → pooled sentence vector (→ unit length when ``normalize``)."""

    def __init__(self, transformer: nn.Module, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise DistillError(f"pooling {pooling!r} is not supported; choose {', '.join(POOLING_MODES)}")
        self.transformer, self.pooling, self.normalize = transformer, pooling, normalize

    @property
    def dim(self) -> int:
        return self.transformer.config.hidden_size

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer state of every token: (batch, length, dim)."""
        return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool_hidden(self.hidden(input_ids, attention_mask), attention_mask)

    def pool_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(input_ids, attention_mask)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


class EncoderClassifier(nn.Module):
    """Pooled (not normalised) encoder output → dropout → linear head → class logits."""

    def __init__(self, encoder: SentenceEncoder, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder.pool(input_ids, attention_mask)))


class SequenceClassifier(nn.Module):
    """An HF ``...ForSequenceClassification`` as (ids, attention) → class logits, in the data's class order:
    ``columns`` picks and orders the model's own labels (a teacher whose ``id2label`` lists them otherwise)."""

    def __init__(self, model: nn.Module, columns: list[int] | None = None):
        super().__init__()
        self.model, self.columns = model, columns

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits if self.columns is None else logits[:, self.columns]


def _read_config(folder: Path):
    if not folder.is_dir():
        raise DistillError(f"encoder {folder} does not exist; pass a local model folder (see distill fetch)")
    if not (folder / "config.json").is_file():
        raise DistillError(f"{folder} is not a model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise DistillError(f"{folder}: unreadable config.json ({str(exc).splitlines()[0][:200]})") from None


def _load_pretrained(path: str | Path, auto_class, what: str):
    """A local HF folder's model (float32, by ``auto_class``), its tokenizer (checked against the model's vocabulary)
    and the folder; one line for each thing that is wrong."""
    folder = Path(path).expanduser()
    config = _read_config(folder)
    tokenizer = load_tokenizer(folder)
    check_tokenizer(tokenizer, config, folder)
    try:
        model = auto_class.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise DistillError(f"{folder}: cannot load {what} ({str(exc).splitlines()[0][:200]})") from None
    return model, tokenizer, folder


def is_sequence_classifier(folder: str | Path) -> bool:
    """Whether ``folder`` holds an HF sequence-classification model (its config names a ...ForSequenceClassification
    architecture), i.e. a classifier with its own head and labels."""
    config = Path(folder).expanduser() / "config.json"
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def class_names(config) -> list[str]:
    """The labels of a sequence-classification config, in the order of its logits."""
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]


def label_columns(teacher_classes: list[str], classes: list[str], folder: Path) -> list[int]:
    """Where each of the data's classes sits among a teacher's labels (exact name, else the same name in another
    case); one line naming what is missing otherwise."""
    exact = {name: i for i, name in enumerate(teacher_classes)}
    folded = {name.casefold(): i for i, name in enumerate(teacher_classes)}
    columns = [exact.get(c, folded.get(str(c).casefold())) for c in classes]
    missing = [c for c, column in zip(classes, columns, strict=True) if column is None]
    if missing:
        raise DistillError(
            f"teacher {folder}: its id2label ({', '.join(teacher_classes[:8])}) does not cover the data's labels "
            f"{', '.join(map(str, missing[:8]))}; relabel the data or the teacher's config.json id2label so the names "
            "match"
        )
    return columns


def load_sequence_classifier(
    path: str | Path, classes: list[str] | None = None
) -> tuple[SequenceClassifier, PreTrainedTokenizerBase, list[str]]:
    """An HF sequence-classification folder → (classifier in eval mode, tokenizer, its labels); with ``classes``,
    its logits come in that order (``label_columns``)."""
    model, tokenizer, folder = _load_pretrained(path, AutoModelForSequenceClassification, "the classifier")
    labels = class_names(model.config)
    columns = None
    if classes is not None:
        columns = label_columns(labels, classes, folder)
        columns = None if columns == list(range(len(labels))) else columns
    return SequenceClassifier(model, columns).eval(), tokenizer, labels


def classifier_from_encoder(transformer: nn.Module, classes: list[str], dropout: float = 0.1) -> SequenceClassifier:
    """The sequence-classification model of ``transformer``'s architecture, with its encoder weights (the pooler
    and the head newly initialised where the encoder has none) and ``classes`` as its labels."""
    config = copy.deepcopy(transformer.config)
    config.num_labels = len(classes)
    config.id2label = dict(enumerate(map(str, classes)))
    config.label2id = {str(name): i for i, name in enumerate(classes)}
    config.architectures = None
    config.classifier_dropout = dropout  # BERT, RoBERTa, ELECTRA ...; DistilBERT reads seq_classif_dropout
    if hasattr(config, "seq_classif_dropout"):
        config.seq_classif_dropout = dropout
    try:
        model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:
        raise DistillError(
            f"{type(transformer).__name__} has no sequence-classification model in transformers "
            f"({str(exc).splitlines()[0][:160]}); choose another encoder"
        ) from None
    missing, _ = model.base_model.load_state_dict(transformer.state_dict(), strict=False)
    if [key for key in missing if not key.startswith("pooler.")]:
        raise DistillError(
            f"{type(transformer).__name__}'s weights do not fit {type(model).__name__} (missing {missing[0]}); "
            "choose another encoder"
        )
    return SequenceClassifier(model)


def save_sequence_classifier(model: SequenceClassifier, tokenizer, folder: Path) -> Path:
    """The HF folder ``transformers.pipeline("text-classification", model=folder)`` loads, written atomically (a
    teacher whose labels are read in another order keeps its own ``id2label``: ``load_sequence_classifier`` reorders
    them again by name)."""
    with atomic_dir(Path(folder)) as tmp:
        model.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(folder)


def _pooling_of(folder: Path) -> tuple[str, bool]:
    """Pooling mode and normalisation declared by a sentence-transformers folder; mean, unnormalised otherwise."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean", False
    try:
        modules = json.loads(modules_file.read_text())
        types = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling_path = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
        config = json.loads((folder / pooling_path / "config.json").read_text()) if pooling_path else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DistillError(f"{folder}: unreadable sentence-transformers configuration ({exc})") from None
    mode = "cls" if config.get("pooling_mode_cls_token") else "max" if config.get("pooling_mode_max_tokens") else "mean"
    return mode, "Normalize" in types


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise DistillError(f"{folder}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, config, folder: Path) -> None:
    """A tokenizer whose ids run past the model's embedding table belongs to another model."""
    if len(tokenizer) > config.vocab_size:
        raise DistillError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {config.vocab_size}; "
            "the tokenizer belongs to another model — use the tokenizer saved with this model"
        )


def load_encoder(path: str | Path) -> tuple[SentenceEncoder, PreTrainedTokenizerBase]:
    """A local HF encoder or sentence-transformers folder → (encoder in eval mode, tokenizer)."""
    transformer, tokenizer, folder = _load_pretrained(path, AutoModel, "the model weights")
    pooling, normalize = _pooling_of(folder)
    return SentenceEncoder(transformer, pooling, normalize).eval(), tokenizer


def save_encoder(encoder: SentenceEncoder, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """An HF folder with sentence-transformers' modules.json and pooling config, written atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        encoder.transformer.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if encoder.normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
        (tmp / "modules.json").write_text(json.dumps(modules, indent=2))
        (tmp / "1_Pooling").mkdir()
        pooling = {
            "word_embedding_dimension": encoder.dim,
            "pooling_mode_cls_token": encoder.pooling == "cls",
            "pooling_mode_mean_tokens": encoder.pooling == "mean",
            "pooling_mode_max_tokens": encoder.pooling == "max",
        }
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    return folder


def save_classifier_head(model: EncoderClassifier, tokenizer, folder: Path, classes: list[str]) -> Path:
    """Encoder folder plus ``head.safetensors`` and ``classes.json``: the probe teacher as the run used it."""
    save_encoder(model.encoder, tokenizer, folder)
    with atomic_path(folder / "head.safetensors") as tmp:  # umask's mode, not safetensors' 0600
        save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(tmp))
    with atomic_path(folder / "classes.json") as tmp:
        tmp.write_text(json.dumps(classes))
    return folder


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text (special tokens included), cut to ``max_length``; no padding."""
    return tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask for one batch, as long as its longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
    return ids, attention


def padded_batch(
    rows: list[list[int]], indices: torch.Tensor, pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows at ``indices`` as one padded batch on ``device``: (ids, attention mask)."""
    ids, attention = pad([rows[i] for i in indices.tolist()], pad_id)
    return ids.to(device), attention.to(device)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def rows_digest(rows: list[list[int]]) -> str:
    """A short key for a list of token-id rows: cached teacher outputs are stored under it."""
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def batches_by_length(rows: list[list[int]], pad_id: int, batch_size: int):
    """(row indices, ids, attention mask) over every row, rows of similar length together so padding stays small."""
    order = np.argsort([len(r) for r in rows], kind="stable")
    for start in range(0, len(rows), batch_size):
        chosen = order[start : start + batch_size]
        yield (chosen, *pad([rows[i] for i in chosen], pad_id))


@torch.inference_mode()
def encode(model: nn.Module, rows: list[list[int]], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """``model(ids, attention)`` over every row, in batches of similar length; outputs in the input order."""
    model.eval()
    device = next(model.parameters()).device  # a model trained on an accelerator is validated where it is
    outputs: list[np.ndarray] = [None] * len(rows)  # type: ignore[list-item]
    for chosen, ids, attention in batches_by_length(rows, pad_id, batch_size):
        values = to_numpy(model(ids.to(device), attention.to(device)).float())
        for i, value in zip(chosen, values, strict=True):
            outputs[i] = value
    return np.stack(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


def student_encoder(spec, teacher: SentenceEncoder, teacher_tokenizer):
    """(encoder, tokenizer) of the student: a pretrained folder, or the teacher's chosen layers."""
    if spec.path is not None:
        return load_encoder(spec.path)
    cut = student_from_teacher(teacher.transformer, **spec.from_teacher.model_dump())
    return SentenceEncoder(cut, teacher.pooling, teacher.normalize), teacher_tokenizer
