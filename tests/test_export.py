"""distill export: every format round-trips through disk and agrees with the student it came from."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from lm_fixtures import save_tiny, tiny_llama, tiny_qwen2, tiny_tokenizer
from test_lm import TEXT

from distill.errors import DistillError
from distill.export import run_export
from distill.export.quantize import load_int8, quantize_int8, save_int8
from distill.models.classifiers import build_classifier
from distill.recipe import ModelSpec
from distill.tasks import export_run, load_recipe, parse_recipe
from distill.tasks.causal_lm import run as run_lm
from distill.tasks.classifier import run

HAVE_GGUF = importlib.util.find_spec("distill.export.gguf") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="distill.export.gguf is not there yet")


@pytest.fixture(scope="module")
def clf_run(tmp_path_factory):
    """A finished digits run; the student is wide enough that int8 storage overhead does not dominate its size."""
    raw = {
        "name": "tiny",
        "seed": 3,
        "data": {"source": "digits"},
        "teacher": {"model": {"hidden": [64]}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
        "student": {"model": {"hidden": [256, 256]}, "train": {"epochs": 2, "batch_size": 64, "lr": 0.05}},
        "baseline": False,
        "eval": {"latency_runs": 2},
    }
    out = tmp_path_factory.mktemp("clf") / "run"
    run(parse_recipe(raw), out)
    return out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    tok = tiny_tokenizer()
    save_tiny(tiny_llama(tok, layers=2, seed=0), tok, tmp / "teacher")
    (tmp / "corpus.txt").write_text(TEXT)
    raw = {
        "task": "causal_lm",
        "data": {"source": "text", "path": str(tmp / "corpus.txt"), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(tmp / "teacher")},
        "student": {"from_teacher": {"keep": 1}, "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3}},
        "distill": {"signal": "live", "chunk_size": 32},
        "baseline": False,
        "eval": {"batch_size": 4, "threads": 1},
    }
    (tmp / "lm.yaml").write_text(yaml.safe_dump(raw))
    run_lm(load_recipe(tmp / "lm.yaml"), tmp / "run")
    return tmp / "run"


@pytest.mark.parametrize("arch", ["mlp", "cnn", "tied_lm"])
def test_int8_save_load_rebuilds_the_same_model(arch, tmp_path):
    torch.manual_seed(0)
    if arch == "tied_lm":  # Qwen2 ties lm_head to the embedding: the int8 head gets its own copy
        model, meta, x = tiny_qwen2(tiny_tokenizer(), layers=1), {"kind": "causal_lm"}, torch.randint(3, 300, (2, 9))
    else:
        spec = ModelSpec(arch=arch, hidden=[32], channels=[4])
        model = build_classifier(spec, (1, 8, 8), 10).eval()
        info = {"model": spec.model_dump(mode="json"), "input_shape": [1, 8, 8], "num_classes": 10}
        meta, x = {"kind": "classifier", "model": info}, torch.randn(5, 64)
    quantized = quantize_int8(model)
    save_int8(quantized, tmp_path, meta)
    reloaded = load_int8(tmp_path)
    with torch.no_grad():
        run = (lambda m: m(x).logits) if arch == "tied_lm" else (lambda m: m(x))
        torch.testing.assert_close(run(reloaded), run(quantized))
        assert (run(reloaded) - run(model)).abs().max() < 0.1  # int8 is close to, not equal to, the float model
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temp files


@pytest.mark.parametrize("fmt", ["safetensors", "int8", "onnx", "onnx-int8"])
def test_classifier_formats_round_trip(clf_run, fmt):
    result = export_run(clf_run, fmt, force=True)  # force: every run already leaves exports/int8
    target = clf_run / "exports" / fmt
    assert result["path"] == str(target) and target.is_dir()
    assert json.loads((clf_run / "exports" / f"{fmt}.json").read_text()) == result
    assert 100 < result["compared"] <= 2000
    if fmt in ("safetensors", "onnx"):
        assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] < 1e-4
    else:
        assert result["top1_agreement"] >= 0.95
    fp32 = result["student_bytes"]
    if fmt == "safetensors":
        assert (target / "model.safetensors").read_bytes() == (clf_run / "student" / "model.safetensors").read_bytes()
    if fmt == "int8":
        assert (target / "model.int8.pt").stat().st_size <= 0.35 * fp32
    if fmt == "onnx-int8":
        assert result["file_bytes"] <= 0.35 * fp32


@pytest.mark.parametrize("fmt", ["safetensors", "int8", "onnx", "onnx-int8"])
def test_lm_formats_round_trip(lm_run, fmt):
    result = export_run(lm_run, fmt, force=True)
    assert result["compared_unit"] == "token positions" and result["compared"] >= 16
    assert result["top1_agreement"] >= (0.99 if fmt in ("safetensors", "onnx") else 0.90)
    if fmt in ("safetensors", "onnx"):
        assert result["max_abs_logit_diff"] < 1e-3
    assert (lm_run / "exports" / fmt / "tokenizer.json").exists()
    if fmt == "int8":  # smoothed (or knowingly not) before quantizing; the reload above went through load_int8
        assert "smoothquant_alpha" in json.loads((lm_run / "exports" / "int8" / "int8.json").read_text())


@needs_gguf
@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-q8_0"])
def test_lm_gguf_round_trip(lm_run, fmt):
    result = export_run(lm_run, fmt)
    assert (lm_run / "exports" / fmt / "model.gguf").exists()
    assert result["top1_agreement"] >= (0.99 if fmt == "gguf-f16" else 0.90)
    types = json.loads((lm_run / "exports" / f"{fmt}.json").read_text())["matrix_types"]
    assert types == result["matrix_types"] and sum(types.values()) > 0
    assert fmt == "gguf-q8_0" or set(types) == {"F16"}


def test_existing_target_needs_force(clf_run, tmp_path):
    target = tmp_path / "out"
    export_run(clf_run, "safetensors", target)
    (target / "stale.txt").write_text("old")
    with pytest.raises(DistillError, match="already exists; pass --force"):
        export_run(clf_run, "safetensors", target)
    assert (target / "stale.txt").exists()
    export_run(clf_run, "safetensors", target, force=True)
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


def test_unfinished_run_is_refused(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(DistillError, match="no finished student in .*--resume"):
        export_run(tmp_path, "onnx")


def test_gguf_for_a_classifier_names_the_formats_it_can_take(clf_run):
    with pytest.raises(DistillError, match="Llama-family.*classifier.*safetensors, int8, onnx, onnx-int8"):
        export_run(clf_run, "gguf-q8_0", clf_run / "nope")
    assert not (clf_run / "nope").exists()


def test_failed_check_leaves_nothing_behind(clf_run, monkeypatch):
    garbage = np.random.default_rng(0).normal(size=(2000, 10)).astype(np.float32)
    monkeypatch.setattr(run_export, "reload_logits", lambda fmt, s, folder: garbage[: len(s.inputs)])
    with pytest.raises(DistillError, match="int8 export failed its check: top-1 agreement"):
        export_run(clf_run, "int8", clf_run / "bad")
    assert not (clf_run / "bad").exists() and not list(clf_run.glob(".bad*"))
    assert not (clf_run / "exports" / "bad.json").exists()


def test_cli_prints_one_line(clf_run, tmp_path):
    def cli(*args):
        command = [sys.executable, "-m", "distill.cli", "export", str(clf_run), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    done = cli("--format", "safetensors", "--out", str(tmp_path / "x"))
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    print(line)
    assert "\n" not in line and "bytes" in line and "max |logit diff|" in line and "top-1 agreement 100.00%" in line
    again = cli("--format", "safetensors", "--out", str(tmp_path / "x"))
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "--force" in again.stderr
