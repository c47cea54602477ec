"""The command line, as a user runs it: one clear line and a non-zero exit for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

CLI = [sys.executable, "-c", "from distill.cli import main; main()"]


def distill(*args, cwd=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_full_run_writes_the_run_folder(tmp_path, tiny_recipe):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    out = tmp_path / "run"
    result = distill("run", recipe, "--out", out, "--set", "student.train.epochs=3")
    assert result.returncode == 0, result.stderr
    assert "The distilled student is" in result.stdout
    for name in (
        "recipe.yaml",
        "metrics.json",
        "REPORT.md",
        "report.html",
        "training_curves.png",
        "models.png",
        "exports/int8/model.int8.pt",
        "exports/int8.json",
        "log.jsonl",
        "teacher/model.safetensors",
        "baseline/model.safetensors",
        "student/model.safetensors",
    ):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "recipe.yaml").read_text())["student"]["train"]["epochs"] == 3
    metrics = json.loads((out / "metrics.json").read_text())["models"]
    assert set(metrics) == {"teacher", "baseline", "student", "student_int8"}
    for values in metrics.values():
        assert values["test_examples"] == 360 and 0 <= values["test_errors"] <= 360
        assert values["parameters"] > 0 and values["file_bytes"] > 0 and values["latency_ms_batch1"] > 0
    assert metrics["student"]["parameters"] < metrics["teacher"]["parameters"]
    report = (out / "REPORT.md").read_text()
    assert "| student, distilled |" in report and f"| {metrics['student']['test_errors']} |" in report
    terms = {k for line in (out / "log.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {"loss", "kd", "ce", "lr", "stage", "step"} <= terms
    # The finished folder is never silently overwritten; resume of a finished run re-evaluates only.
    assert_one_line_error(distill("run", recipe, "--out", out), "already exists", "--resume", "--force")
    again = distill("run", recipe, "--out", out, "--resume", "--set", "student.train.epochs=3")
    assert again.returncode == 0, again.stderr
    assert_one_line_error(distill("run", recipe, "--out", out, "--resume"), "recipe differs")
    (out / "REPORT.md").unlink()
    assert distill("report", out).returncode == 0 and (out / "REPORT.md").exists()


def test_bad_inputs_fail_with_one_line(tmp_path, tiny_recipe):
    typo = tmp_path / "typo.yaml"
    typo.write_text("distill:\n  temprature: 3\n")
    assert_one_line_error(
        distill("run", typo, "--out", tmp_path / "x"), "distill.temprature: unknown key", "temperature"
    )
    assert_one_line_error(distill("run", tmp_path / "missing.yaml"), "does not exist")
    no_data = tmp_path / "nodata.yaml"
    no_data.write_text(yaml.safe_dump(tiny_recipe | {"data": {"source": "mnist", "path": str(tmp_path)}}))
    assert_one_line_error(distill("run", no_data, "--out", tmp_path / "y"), "is missing", "distill fetch mnist")
    assert not (tmp_path / "y").exists(), "nothing is written before the input is known to be good"
    assert_one_line_error(distill("run", typo, "--set", "oops"), "expected KEY=VALUE")
    assert_one_line_error(distill("report", tmp_path), "no metrics.json")
    assert_one_line_error(distill("fetch", "imagenet"), "unknown data set")


def test_cnn_teacher_python_student_bf16_and_live_teacher(tmp_path, tiny_recipe):
    import os

    tiny_recipe["teacher"]["model"] = {"arch": "cnn", "channels": [8, 16]}
    tiny_recipe["student"]["model"] = {"arch": "python", "factory": "custom_model:build", "kwargs": {"width": 12}}
    tiny_recipe["distill"]["signal"] = "live"
    tiny_recipe["mixed_precision"] = "bf16"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([*CLI, "run", recipe, "--out", tmp_path / "run"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]
    assert metrics["student"]["parameters"] == 64 * 12 + 12 + 12 * 10 + 10
    assert not (tmp_path / "run" / "cache").exists(), "live signal writes no cache"
    bad = tmp_path / "bad.yaml"
    tiny_recipe["student"]["model"] = {"arch": "python", "factory": "custom_model:not_a_model"}
    bad.write_text(yaml.safe_dump(tiny_recipe))
    result = subprocess.run([*CLI, "run", bad, "--out", tmp_path / "bad"], capture_output=True, text=True, env=env)
    assert_one_line_error(result, "returned str, not an nn.Module")
    assert not (tmp_path / "bad").exists()
