"""Array data for classifiers: MNIST idx files, sklearn digits, .npy and CSV.

Every source ends as an ``ArrayData``: float32 inputs, int64 labels where ``IGNORE_INDEX`` marks an
unlabeled (transfer) example, a held-out test split, and the input shape for image models.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from distill.data.splits import UNLABELED_SEED_OFFSET, validation_rows
from distill.errors import DistillError
from distill.losses import IGNORE_INDEX
from distill.recipe import DataSpec

MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class ArrayData:
    train_x: np.ndarray  # float32 [N, ...features]
    train_y: np.ndarray  # int64 [N], IGNORE_INDEX where unlabeled
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]  # per-example shape for image models, e.g. (1, 28, 28)
    val_x: np.ndarray | None = None  # labeled examples held out of training (data.validation_fraction)
    val_y: np.ndarray | None = None

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    def fingerprint(self) -> str:
        """Content hash of the training inputs: a teacher cache is only valid for these exact inputs."""
        digest = hashlib.sha256()
        digest.update(str(self.train_x.shape).encode())
        digest.update(np.ascontiguousarray(self.train_x).data)
        return digest.hexdigest()[:16]


def default_mnist_dir() -> Path:
    root = os.environ.get("DISTILL_CACHE", str(Path.home() / ".cache" / "distill"))
    return Path(root) / "mnist"


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one idx file (big-endian header: magic, dims), checking it is complete."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        fetch = "fashion-mnist" if path.parent.name == "fashion-mnist" else "mnist"
        raise DistillError(f"idx file {path} is missing; run `distill fetch {fetch}`") from None
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != expected_magic:
        raise DistillError(f"{path} is not an idx file (bad magic number); fetch it again")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != int(np.prod(dims)):
        raise DistillError(
            f"{path} is truncated or padded: header says {int(np.prod(dims))} bytes of data, "
            f"file has {len(raw) - header}; fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(folder: Path) -> ArrayData:
    images = {k: read_idx(folder / MNIST_FILES[k], 0x0803) for k in ("train_x", "test_x")}
    labels = {k: read_idx(folder / MNIST_FILES[k], 0x0801) for k in ("train_y", "test_y")}
    for split in ("train", "test"):
        if len(images[f"{split}_x"]) != len(labels[f"{split}_y"]):
            raise DistillError(f"MNIST {split} images and labels differ in count in {folder}")
    return ArrayData(
        train_x=(images["train_x"].reshape(-1, 784) / 255.0).astype(np.float32),
        train_y=labels["train_y"].astype(np.int64),
        test_x=(images["test_x"].reshape(-1, 784) / 255.0).astype(np.float32),
        test_y=labels["test_y"].astype(np.int64),
        num_classes=10,
        input_shape=(1, 28, 28),
    )


def load_digits_data(seed: int = 0) -> ArrayData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:360], order[360:]
    return ArrayData(x[train], y[train], x[test], y[test], 10, (1, 8, 8))


def _load_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DistillError(f"{what} file {path} is missing") from None
    except (ValueError, OSError) as exc:
        raise DistillError(f"{what} file {path} is not a readable .npy array: {exc}") from None


def _features(values: np.ndarray, where: Path) -> np.ndarray:
    """Inputs as float32, refused when they are not real finite numbers: text would fail a cast mid-way, complex
    numbers would lose their imaginary part silently, and a NaN or infinite input surfaces hours later as "loss
    became nan" with advice about the learning rate."""
    if values.dtype.kind == "c":
        raise DistillError(
            f"inputs in {where} are complex numbers ({values.dtype}); give real features, e.g. the real and "
            "imaginary parts as separate columns"
        )
    if values.dtype.kind not in "biuf":
        raise DistillError(
            f"inputs in {where} are {values.dtype} values, not numbers; save them as a numeric array, e.g. "
            "np.save(path, x.astype(np.float32))"
        )
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
        x = values.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        raise DistillError(
            f"inputs in {where} hold {int(bad.sum())} NaN or infinite value(s) (or beyond float32), the first in "
            f"example {int(np.argwhere(bad)[0][0])}; fill or drop them"
        )
    return x


def _labels(values: np.ndarray, where: Path) -> np.ndarray:
    if values.ndim != 1:
        raise DistillError(f"labels in {where} must be one integer per example, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.integer):
        if np.issubdtype(values.dtype, np.floating) and np.all(np.isnan(values) | (values == np.round(values))):
            values = np.where(np.isnan(values), IGNORE_INDEX, values)
        else:
            raise DistillError(f"labels in {where} must be integers, got dtype {values.dtype}")
    return values.astype(np.int64)


def load_npy(folder: Path) -> ArrayData:
    arrays = {k: _load_npy(folder / f"{k}.npy", "data") for k in ("train_x", "train_y", "test_x", "test_y")}
    shape = arrays["train_x"].shape[1:]
    return _assemble(
        _features(arrays["train_x"], folder / "train_x.npy"),
        _labels(arrays["train_y"], folder / "train_y.npy"),
        _features(arrays["test_x"], folder / "test_x.npy"),
        _labels(arrays["test_y"], folder / "test_y.npy"),
        shape,
        folder,
    )


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise DistillError(f"CSV file {path} is missing") from None
    if not rows:
        raise DistillError(f"CSV file {path} is empty")
    header, body = rows[0], rows[1:]
    if label_column not in header:
        raise DistillError(f"CSV file {path} has no column {label_column!r}; columns are {header}")
    col = header.index(label_column)
    try:
        x = np.array([[float(v) for i, v in enumerate(r) if i != col] for r in body], dtype=np.float32)
        y = np.array([int(r[col]) if r[col].strip() else IGNORE_INDEX for r in body], dtype=np.int64)
    except (ValueError, IndexError) as exc:
        raise DistillError(
            f"CSV file {path}: every feature must be a number and every label an integer ({exc})"
        ) from None
    return _features(x, path), y


def load_csv(folder: Path, label_column: str) -> ArrayData:
    train_x, train_y = _read_csv(folder / "train.csv", label_column)
    test_x, test_y = _read_csv(folder / "test.csv", label_column)
    return _assemble(train_x, train_y, test_x, test_y, train_x.shape[1:], folder)


def _assemble(train_x, train_y, test_x, test_y, shape, where: Path) -> ArrayData:
    if len(train_x) == 0 or len(test_x) == 0:
        raise DistillError(f"data in {where} is empty: need at least one training and one test example")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DistillError(f"data in {where}: inputs and labels differ in count")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise DistillError(f"data in {where}: train inputs {train_x.shape[1:]} and test {test_x.shape[1:]} differ")
    known = np.concatenate([train_y[train_y != IGNORE_INDEX], test_y])
    if known.size == 0 or known.min() < 0:
        raise DistillError(f"data in {where}: labels must be integers 0..C-1 (unlabeled rows: empty or NaN)")
    # Labels are class indices 0..C-1 and a class without examples is never learned, so C cannot exceed the number
    # of labeled examples. A larger label is a typo (1000000000 for 1) that would size the model's output layer and
    # the per-class tables by it: hundreds of gigabytes, or the OOM killer.
    if known.max() >= known.size:
        raise DistillError(
            f"data in {where}: label {known.max()} with only {known.size} labeled examples ({len(np.unique(known))} "
            "distinct labels); labels are class indices 0..C-1 and C cannot exceed the labeled examples: fix the typo "
            "or renumber them (e.g. np.unique(y, return_inverse=True))"
        )
    image_shape = tuple(int(s) for s in shape) if len(shape) == 3 else (int(np.prod(shape)),)
    return ArrayData(
        train_x.reshape(len(train_x), -1).astype(np.float32),
        train_y,
        test_x.reshape(len(test_x), -1).astype(np.float32),
        test_y.astype(np.int64),
        int(known.max()) + 1,
        image_shape,
    )


def load_data(spec: DataSpec, seed: int = 0) -> ArrayData:
    """Load the source named by the recipe, then apply limits and the labeled/unlabeled split."""
    if spec.source == "mnist":
        data = load_mnist(Path(spec.path).expanduser() if spec.path else default_mnist_dir())
    elif spec.source == "digits":
        data = load_digits_data(seed)
    elif spec.path is None:
        raise DistillError(f"data.source {spec.source!r} needs data.path (a folder)")
    elif spec.source == "npy":
        data = load_npy(Path(spec.path).expanduser())
    else:
        data = load_csv(Path(spec.path).expanduser(), spec.label_column)
    if spec.limit_train:
        data = replace(data, train_x=data.train_x[: spec.limit_train], train_y=data.train_y[: spec.limit_train])
    if spec.limit_test:
        data = replace(data, test_x=data.test_x[: spec.limit_test], test_y=data.test_y[: spec.limit_test])
    return with_validation(with_unlabeled(data, spec, seed), spec.validation_fraction, seed)


def with_validation(data: ArrayData, fraction: float, seed: int) -> ArrayData:
    """Hold out ``fraction`` of the labeled training examples, class by class (seeded), as the validation split
    every stage is checked on; the test split is never touched."""
    if fraction == 0:
        return data
    hint = "add labeled examples, raise data.labeled_fraction or set data.validation_fraction: 0"
    names = [str(label) for label in range(data.num_classes)]
    held = validation_rows(
        len(data.train_y), fraction, seed, labels=data.train_y, class_names=names, unit="example", hint=hint
    )
    keep = np.ones(len(data.train_y), dtype=bool)
    keep[held] = False
    return replace(
        data,
        train_x=data.train_x[keep],
        train_y=data.train_y[keep],
        val_x=data.train_x[held],
        val_y=data.train_y[held],
    )


def with_unlabeled(data: ArrayData, spec: DataSpec, seed: int) -> ArrayData:
    """Hide labels of all but ``labeled_fraction`` of the training set and append extra unlabeled inputs."""
    train_y = data.train_y.copy()
    if spec.labeled_fraction < 1.0:
        rng = np.random.default_rng(seed + UNLABELED_SEED_OFFSET)
        hidden = rng.permutation(len(train_y))[int(round(spec.labeled_fraction * len(train_y))) :]
        train_y[hidden] = IGNORE_INDEX
    train_x = data.train_x
    if spec.unlabeled_path:
        where = Path(spec.unlabeled_path).expanduser()
        extra = _features(_load_npy(where, "unlabeled"), where)
        extra = extra.reshape(len(extra), -1)
        if extra.shape[1] != train_x.shape[1]:
            raise DistillError(
                f"unlabeled inputs in {spec.unlabeled_path} have {extra.shape[1]} features, "
                f"the training data has {train_x.shape[1]}"
            )
        train_x = np.concatenate([train_x, extra])
        train_y = np.concatenate([train_y, np.full(len(extra), IGNORE_INDEX, dtype=np.int64)])
    if np.any(train_y[train_y != IGNORE_INDEX] >= data.num_classes) or np.any(data.test_y >= data.num_classes):
        raise DistillError(f"labels out of range: expected 0..{data.num_classes - 1}")
    return replace(data, train_x=train_x, train_y=train_y)
