import numpy as np
import pytest

from distill.data.arrays import MNIST_FILES, load_data, load_mnist, read_idx
from distill.errors import DistillError
from distill.losses import IGNORE_INDEX
from distill.recipe import DataSpec


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(folder, n_train=50, n_test=20):
    rng = np.random.default_rng(0)
    write_idx(folder / MNIST_FILES["train_x"], rng.integers(0, 256, (n_train, 28, 28)), 0x0803)
    write_idx(folder / MNIST_FILES["train_y"], rng.integers(0, 10, n_train), 0x0801)
    write_idx(folder / MNIST_FILES["test_x"], rng.integers(0, 256, (n_test, 28, 28)), 0x0803)
    write_idx(folder / MNIST_FILES["test_y"], rng.integers(0, 10, n_test), 0x0801)


def test_mnist_idx_round_trip(tmp_path):
    fake_mnist(tmp_path)
    data = load_mnist(tmp_path)
    raw = read_idx(tmp_path / MNIST_FILES["train_x"], 0x0803)
    assert data.train_x.shape == (50, 784) and data.train_x.dtype == np.float32
    np.testing.assert_allclose(data.train_x[3], raw[3].reshape(-1) / 255.0, rtol=1e-6)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10


def test_truncated_or_missing_idx_is_reported(tmp_path):
    fake_mnist(tmp_path)
    path = tmp_path / MNIST_FILES["train_x"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DistillError, match="truncated"):
        load_mnist(tmp_path)
    (tmp_path / MNIST_FILES["test_y"]).unlink()
    with pytest.raises(DistillError, match="missing; run `distill fetch mnist`"):
        read_idx(tmp_path / MNIST_FILES["test_y"], 0x0801)
    (tmp_path / "junk").write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(DistillError, match="bad magic"):
        read_idx(tmp_path / "junk", 0x0803)


def test_labeled_fraction_and_extra_unlabeled(tmp_path):
    extra = np.random.default_rng(1).random((40, 64)).astype(np.float32)
    np.save(tmp_path / "extra.npy", extra)
    data = load_data(
        DataSpec(
            source="digits", labeled_fraction=0.25, unlabeled_path=str(tmp_path / "extra.npy"), validation_fraction=0
        )
    )
    n = len(data.train_x) - 40
    labeled = data.train_y[:n] != IGNORE_INDEX
    assert labeled.sum() == round(0.25 * n)
    assert np.all(data.train_y[n:] == IGNORE_INDEX)
    np.testing.assert_array_equal(data.train_x[n:], extra)
    np.save(tmp_path / "bad.npy", extra[:, :10])
    with pytest.raises(DistillError, match="10 features, the training data has 64"):
        load_data(DataSpec(source="digits", unlabeled_path=str(tmp_path / "bad.npy")))


def test_npy_and_csv_sources(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 30), ("test", 10)):
        np.save(tmp_path / f"{split}_x.npy", rng.random((n, 5)).astype(np.float32))
        np.save(tmp_path / f"{split}_y.npy", rng.integers(0, 3, n))
    data = load_data(DataSpec(source="npy", path=str(tmp_path), validation_fraction=0))
    assert data.train_x.shape == (30, 5) and data.num_classes == 3
    (tmp_path / "train.csv").write_text("a,b,label\n1,2,0\n3,4,\n5,6,1\n")
    (tmp_path / "test.csv").write_text("a,b,label\n1,2,1\n")
    data = load_data(DataSpec(source="csv", path=str(tmp_path), validation_fraction=0))
    assert data.train_y.tolist() == [0, IGNORE_INDEX, 1]
    with pytest.raises(DistillError, match="no column 'y'"):
        load_data(DataSpec(source="csv", path=str(tmp_path), label_column="y"))
    (tmp_path / "train.csv").write_text("a,b,label\n1,x,0\n")
    with pytest.raises(DistillError, match="must be a number"):
        load_data(DataSpec(source="csv", path=str(tmp_path)))
    with pytest.raises(DistillError, match="needs data.path"):
        load_data(DataSpec(source="csv"))


def test_negative_labels_are_rejected(tmp_path):
    np.save(tmp_path / "train_x.npy", np.zeros((3, 2), np.float32))
    np.save(tmp_path / "train_y.npy", np.array([0, -5, 1]))
    np.save(tmp_path / "test_x.npy", np.zeros((1, 2), np.float32))
    np.save(tmp_path / "test_y.npy", np.array([1]))
    with pytest.raises(DistillError, match="labels must be integers 0..C-1"):
        load_data(DataSpec(source="npy", path=str(tmp_path)))
