"""Device bugs caught on a CPU-only machine: a lint rule (every tensor → NumPy conversion goes through
distill.devices.to_numpy) and the accelerator stand-in of accelerator_sim.py."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerator_sim import MESSAGE, outputs_on_accelerator

from distill.devices import to_numpy
from distill.tasks import parse_recipe, run_recipe
from distill.teachers.live import LiveTeacher
from distill.teachers.logits_cache import build_logits_cache

PACKAGE = Path(__file__).parents[1] / "src" / "distill"


def test_numpy_conversions_go_through_one_helper():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "devices.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"use distill.devices.to_numpy, not .numpy(): {offenders}"


def test_the_stand_in_fails_as_cuda_does_and_to_numpy_works_on_it():
    model = torch.nn.Linear(3, 2)
    with outputs_on_accelerator():
        out = model(torch.ones(4, 3)).softmax(-1)
        for convert in (lambda: out.numpy(), lambda: np.asarray(out), lambda: out.detach().numpy()):
            with pytest.raises(TypeError, match="cuda"):
                convert()
        assert isinstance(to_numpy(out), np.ndarray)
    assert MESSAGE.startswith("can't convert cuda")


def test_logits_cache_reads_a_teacher_left_on_its_device(tmp_path):
    """Issue 17.2: the cache builder called .numpy() on the live teacher's output, which fails on a GPU."""
    torch.manual_seed(0)
    teacher = LiveTeacher(torch.nn.Linear(5, 3))
    x = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    with outputs_on_accelerator():
        cache = build_logits_cache(tmp_path / "c", teacher, x, teacher_id="t", data_id="d", batch_size=4)
    expected = teacher.model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(cache.logits), expected, rtol=1e-6)


@pytest.mark.parametrize("signal", ["cache", "live"])
def test_a_classifier_run_with_every_model_output_on_an_accelerator(tmp_path, tiny_recipe, signal):
    """The demo's task, whole, in process (the stand-in does not reach a subprocess): teacher, cache or live
    teacher, both students, int8, evaluation, report — with the same results as a plain run."""
    tiny_recipe["distill"]["signal"] = signal
    tiny_recipe["data"]["limit_train"] = 300
    with outputs_on_accelerator():
        simulated = run_recipe(parse_recipe(tiny_recipe), tmp_path / "simulated")
    plain = run_recipe(parse_recipe(tiny_recipe), tmp_path / "plain")
    assert (tmp_path / "simulated" / "REPORT.md").is_file()
    for name in ("teacher", "baseline", "student"):
        assert simulated["models"][name]["test_errors"] == plain["models"][name]["test_errors"], name
