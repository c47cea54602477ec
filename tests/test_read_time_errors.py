"""Values that used to be accepted when the recipe or the data was read and crashed later (a NaN loss, a model with no
units, an allocation sized by a typo): each is now one line when it is read, before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_cli import assert_one_line_error, distill

from distill.data.arrays import load_data
from distill.errors import DistillError
from distill.recipe import DataSpec
from distill.tasks import load_recipe, parse_recipe


def write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("student:\n  model:\n    hidden: [-5]\n", "student.model.hidden.0 = -5: Input should be greater than 0"),
        ("teacher:\n  model:\n    hidden: [64, 0]\n", "teacher.model.hidden.1 = 0: Input should be greater than 0"),
        ("student:\n  model:\n    arch: cnn\n    channels: [0]\n", "student.model.channels.0 = 0: Input should be"),
        ("seed: -1\n", "seed = -1: Input should be greater than or equal to 0"),
        ("task: causal_lm\nseed: -1\n", "seed = -1: Input should be greater than or equal to 0"),
        ("student:\n  train:\n    lr: 1e308\n", "student.train.lr = '1e308': must be at most 10"),
        ("teacher:\n  train:\n    lr: 1e308\n", "teacher.train.lr = '1e308': Input should be less than or equal to 10"),
        ("student:\n  train:\n    lr: .nan\n", "student.train.lr = nan: must be a number > 0, or auto"),
        ("teacher:\n  train:\n    lr: .nan\n", "teacher.train.lr = nan: Input should be a finite number"),
        ("distill:\n  temperature: .inf\n", "distill.temperature = inf: must be a number > 0, or auto"),
        ("task: causal_lm\ndistill:\n  temperature: .inf\n", "distill.temperature = inf: Input should be a finite"),
        ("distill:\n  alpha: .nan\n", "distill.alpha = nan: must be a number, or auto"),
        ("student:\n  train:\n    weight_decay: .inf\n", "weight_decay = inf: Input should be a finite number"),
        ("data:\n  labeled_fraction: .nan\n", "data.labeled_fraction = nan: Input should be a finite number"),
        ("student:\n  train:\n    max_grad_norm: .inf\n", "max_grad_norm = inf: Input should be a finite number"),
    ],
)
def test_values_that_crashed_later_fail_when_the_recipe_is_read(tmp_path, text, expected):
    with pytest.raises(DistillError) as err:
        load_recipe(write(tmp_path, text))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_every_float_of_every_schema_refuses_nan_and_inf():
    """The refusal is on the base model, so a float field added later refuses them too."""
    for raw in (
        {"task": "text_classification", "teacher": {"probe_c": float("inf")}},
        {"task": "embedding", "distill": {"token_states": float("nan")}},
        {"task": "causal_lm", "distill": {"onpolicy": {"temperature": float("inf")}}},
        {"task": "generate", "prompts": {"path": "p"}, "teacher": {"path": "t"}, "sampling": {"top_p": float("nan")}},
    ):
        with pytest.raises(DistillError, match=r"= (inf|nan): (must be a number > 0|Input should be a finite)"):
            parse_recipe(raw)
    assert parse_recipe({"student": {"train": {"lr": 10}}}).student.train.lr == 10  # the bound itself is allowed


def test_a_number_yaml_reads_as_a_string_is_a_number(tmp_path):
    """PyYAML reads 1e-3 (no dot) as a string; the plain float fields took it, the ``auto`` ones refused it."""
    recipe = load_recipe(
        write(tmp_path, "student:\n  train:\n    lr: 1e-3\ndistill:\n  temperature: 2e0\n  alpha: 1e-1\n")
    )
    assert (recipe.student.train.lr, recipe.distill.temperature, recipe.distill.alpha) == (1e-3, 2.0, 0.1)


def test_duplicate_keys_are_refused_naming_the_key_and_line(tmp_path):
    text = "name: x\ndistill:\n  loss: jsd\nstudent:\n  train: {epochs: 2}\ndistill:\n  temperature: 2\n"
    with pytest.raises(DistillError, match=r"invalid YAML at line 6, column 1: duplicate key 'distill'; keep one"):
        load_recipe(write(tmp_path, text))
    with pytest.raises(DistillError, match=r"line 2, column 22: duplicate key 'epochs'"):
        load_recipe(write(tmp_path, "student:\n  train: {epochs: 2, epochs: 3}\n"))
    with pytest.raises(DistillError, match=r"--set 'distill=\{loss: jsd, loss: tvd\}'.*duplicate key 'loss'"):
        load_recipe(write(tmp_path, "name: x\n"), ["distill={loss: jsd, loss: tvd}"])


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(DistillError, match=r"recipe .*r.yaml is not UTF-8 text \(byte 0xe9 at offset 9\); save it as"):
        load_recipe(path)
    path.write_bytes("name: café\n".encode())  # UTF-8 reads whatever the locale
    assert load_recipe(path).name == "café"


def npy_data(folder, train_x, train_y, test_x=None, test_y=None) -> DataSpec:
    for name, array in (("train_x", train_x), ("train_y", train_y), ("test_x", test_x), ("test_y", test_y)):
        np.save(folder / f"{name}.npy", array if array is not None else {"test_x": train_x, "test_y": train_y}[name])
    return DataSpec(source="npy", path=str(folder), validation_fraction=0)


X, Y = np.arange(18, dtype=np.float32).reshape(6, 3) / 18, np.array([0, 1, 2, 0, 1, 2])
ONE = np.arange(18).reshape(6, 3) == 13  # example 4, feature 1


def test_a_mistyped_label_is_refused_before_anything_is_sized_by_it(tmp_path):
    # validation_fraction 0: the old code returned 1000000001 classes here (with a validation split it first built a
    # list of a billion class names; the model head would have taken the rest of the memory)
    typo = np.array([0, 1, 2, 0, 1, 1_000_000_000])
    with pytest.raises(DistillError, match=r"label 1000000000 with only 8 labeled examples \(4 distinct labels\); "):
        load_data(npy_data(tmp_path, X, typo, X[:2], np.array([0, 1])))
    with pytest.raises(DistillError, match="C cannot exceed the labeled examples: fix the typo or renumber them"):
        load_data(npy_data(tmp_path, X, np.array([0, 1, 2, 0, 1, 8]), X[:2], np.array([0, 1])))
    assert load_data(npy_data(tmp_path, X, np.array([0, 1, 2, 0, 1, 7]), X[:2], np.array([0, 1]))).num_classes == 8


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        (
            {"train_x": np.where(ONE, np.nan, X)},
            r"train_x.npy hold 1 NaN or infinite value\(s\) .*, the first in example 4; fill or drop them",
        ),
        ({"test_x": np.array([[1.0, np.inf, 0.0]] * 6)}, r"test_x.npy hold 6 NaN or infinite value\(s\)"),
        ({"train_x": np.where(ONE, 1e300, X.astype(np.float64))}, r"infinite value\(s\) \(or beyond float32\)"),
        ({"train_x": np.array([["1", "2", "abc"]] * 6)}, r"train_x.npy are <U3 values, not numbers; save them as a"),
        ({"train_x": X + 1j}, r"train_x.npy are complex numbers \(complex64\); give real features"),
    ],
    ids=["nan", "inf", "beyond-float32", "strings", "complex"],
)
def test_features_that_are_not_finite_real_numbers_are_refused_when_read(tmp_path, arrays, expected):
    with pytest.raises(DistillError, match=expected):
        load_data(npy_data(tmp_path, arrays.get("train_x", X), Y, arrays.get("test_x")))


def test_non_finite_csv_cells_and_unlabeled_inputs_are_refused_when_read(tmp_path):
    (tmp_path / "train.csv").write_text("a,b,label\n1,nan,0\n3,4,1\n")
    (tmp_path / "test.csv").write_text("a,b,label\n1,2,1\n")
    with pytest.raises(DistillError, match=r"train.csv hold 1 NaN or infinite value\(s\)"):
        load_data(DataSpec(source="csv", path=str(tmp_path), validation_fraction=0))
    np.save(tmp_path / "extra.npy", np.full((2, 64), np.inf))
    with pytest.raises(DistillError, match=r"extra.npy hold 128 NaN or infinite"):
        load_data(DataSpec(source="digits", unlabeled_path=str(tmp_path / "extra.npy"), validation_fraction=0))


def test_read_time_errors_at_the_command_line_write_nothing(tmp_path, tiny_recipe):
    data = tmp_path / "data"
    data.mkdir()
    x = np.random.default_rng(0).random((20, 3)).astype(np.float32)
    x[3, 0] = np.nan
    for split in ("train", "test"):
        np.save(data / f"{split}_x.npy", x)
        np.save(data / f"{split}_y.npy", np.arange(20) % 2)
    nan_data = {**tiny_recipe, "data": {"source": "npy", "path": str(data)}}
    nan_lr = {**tiny_recipe, "student": {**tiny_recipe["student"], "train": {"lr": float("nan")}}}
    cases = {
        "nan_lr.yaml": (yaml.safe_dump(nan_lr), "student.train.lr = nan"),
        "twice.yaml": (yaml.safe_dump(tiny_recipe) + "seed: 4\n", "duplicate key 'seed'"),
        "nan_data.yaml": (yaml.safe_dump(nan_data), "NaN or infinite value(s)"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"run-{name}"
        assert_one_line_error(distill("run", tmp_path / name, "--out", out), fragment)
        assert not out.exists()
