"""``distill export``: write a run's student in a deployable format, then reload it from disk and check it
against the student on held-out data before calling it done. A failed check leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.errors import DistillError
from distill.io import atomic_dir, write_json

FORMATS = ("safetensors", "int8", "onnx", "onnx-int8", "gguf-f16", "gguf-q8_0")
GGUF = ("gguf-f16", "gguf-q8_0")
# The check: top-1 agreement with the source student, and for lossless formats also max |logit diff| relative to the
# largest |logit|. f16 weights round at ~5e-4 relative, so gguf-f16 gets a looser bound than fp32 re-encodings.
MIN_AGREEMENT = {"safetensors": 0.99, "onnx": 0.99, "gguf-f16": 0.99}  # lossy formats (int8): 0.90
MIN_AGREEMENT_LOSSY = 0.90
# An LM's top-1 flips wherever its two best tokens are close, which a small student's flat distributions often
# are: its lossy exports are checked at 0.8 (perplexity, the quality that counts, is measured by bench/quantize.py).
MIN_AGREEMENT_LOSSY_LM = 0.80
MAX_RELATIVE_DIFF = {"safetensors": 1e-3, "onnx": 1e-3, "gguf-f16": 1e-2}
MODEL_FILES = (".safetensors", ".int8.pt", ".onnx", ".onnx.data", ".gguf")  # counted in file_bytes (not tokenizers)
CLASSIFIER_EXAMPLES = 2000
LM_BLOCKS = 8


@dataclass
class Student:
    kind: str  # "classifier" or "causal_lm"
    model: nn.Module
    folder: Path
    inputs: np.ndarray  # held-out features (float32) or token blocks (int64)
    mask: np.ndarray | None = None  # causal_lm: real (non-padding) positions
    info: dict | None = None  # classifier: model.json (what rebuilds it)
    tokenizer: object = None
    calibration: np.ndarray | None = None  # causal_lm: training blocks that int8 smoothing is calibrated on


def export_run(run_dir: Path, fmt: str, out: Path | None = None, *, force: bool = False) -> dict:
    """Export ``RUN/student`` as ``fmt`` into ``out`` (default ``RUN/exports/<fmt>/``) and return the check's figures,
    also written to ``RUN/exports/<fmt>.json``."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise DistillError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    folder = run_dir / "student"
    if not (folder / "model.safetensors").exists():
        raise DistillError(
            f"no finished student in {run_dir}; finish it with distill run RECIPE --out {run_dir} --resume"
        )
    from distill.recipe import LMRecipe, load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    kind = "causal_lm" if isinstance(recipe, LMRecipe) else "classifier"
    allowed = formats_for(kind, folder)
    if fmt not in allowed:
        what = f"a {_model_type(folder)} causal LM" if kind == "causal_lm" else "a classifier"
        raise DistillError(
            f"{fmt} needs a Llama-family causal LM student (the GGUF writer knows only llama); this run's student is "
            f"{what}; it can be exported as: {', '.join(allowed)}"
        )
    target = Path(out) if out is not None else run_dir / "exports" / fmt
    if target.exists() and not force:
        raise DistillError(f"export target {target} already exists; pass --force to replace it")

    student = load_student(run_dir, recipe, kind)
    with atomic_dir(target) as tmp:  # a failed check raises: the temp folder goes, the target stays as it was
        write_export(fmt, student, tmp)
        figures = check_export(fmt, student, tmp)
    result = {"format": fmt, "path": str(target), **figures}
    write_json(run_dir / "exports" / f"{fmt}.json", result)
    return result


def formats_for(kind: str, student_folder: Path) -> list[str]:
    if kind == "causal_lm" and _model_type(student_folder) == "llama":
        return list(FORMATS)
    return [f for f in FORMATS if f not in GGUF]


def _model_type(student_folder: Path) -> str:
    config = student_folder / "config.json"
    return json.loads(config.read_text()).get("model_type", "unknown") if config.is_file() else "unknown"


def load_student(run_dir: Path, recipe, kind: str) -> Student:
    """The finished student and the held-out inputs its export is checked on."""
    folder = run_dir / "student"
    if kind == "causal_lm":
        from distill.export.smooth import CALIBRATION_BLOCKS, SCORED_BLOCKS
        from distill.lm import load_lm_data
        from distill.models.causal_lm import load_causal_lm

        model, tokenizer = load_causal_lm(folder)
        train, heldout = load_lm_data(recipe.data, tokenizer, recipe.seed)
        blocks = heldout.subset(np.arange(min(len(heldout), LM_BLOCKS)))
        ids, mask = blocks.input_ids.astype(np.int64), blocks.attention_mask.astype(bool)
        calibration = train.input_ids[: CALIBRATION_BLOCKS + SCORED_BLOCKS].astype(np.int64)
        return Student(kind, model, folder, ids, mask, tokenizer=tokenizer, calibration=calibration)
    from distill.data.arrays import load_data
    from distill.models.classifiers import load_classifier
    from distill.recipe import ModelSpec

    info = json.loads((folder / "model.json").read_text())
    spec, shape = ModelSpec(**info["model"]), tuple(info["input_shape"])
    model = load_classifier(folder / "model.safetensors", spec, shape, info["num_classes"])
    test_x = load_data(recipe.data, recipe.seed).test_x[:CLASSIFIER_EXAMPLES]
    return Student(kind, model.eval(), folder, np.ascontiguousarray(test_x, dtype=np.float32), info=info)


def write_export(fmt: str, s: Student, folder: Path) -> None:
    lm = s.kind == "causal_lm"
    if fmt == "safetensors":  # the student's own files, byte for byte (the HF folder for an LM)
        for file in s.folder.iterdir():
            if file.is_file() and not file.name.startswith("checkpoint."):
                shutil.copy2(file, folder / file.name)
        return
    if fmt == "int8":
        from distill.export.quantize import quantize_int8, save_int8

        model, meta = s.model, {"kind": s.kind, "model": s.info}
        if s.calibration is not None:
            from distill.export.smooth import smooth_llama

            model, meta["smoothquant_alpha"] = smooth_llama(model, torch.from_numpy(s.calibration))
        save_int8(quantize_int8(model), folder, meta)
    elif fmt in ("onnx", "onnx-int8"):
        from distill.export.onnx import export_onnx, quantize_onnx_int8

        # batch 2: torch.export specialises a dimension whose example size is 1
        example = torch.from_numpy(np.resize(s.inputs, (2, *s.inputs.shape[1:])))
        if fmt == "onnx":
            export_onnx(s.model, example, folder / "model.onnx", lm=lm)
        else:
            with tempfile.TemporaryDirectory() as work:
                float_onnx = export_onnx(s.model, example, Path(work) / "model.onnx", lm=lm)
                quantize_onnx_int8(float_onnx, folder / "model.onnx")
    else:
        from distill.export.gguf import export_gguf

        export_gguf(s.model, s.tokenizer, folder / "model.gguf", fmt.removeprefix("gguf-"))
        return  # a GGUF file carries its tokenizer
    if lm:  # int8 and ONNX models need the tokenizer beside them to be usable
        s.tokenizer.save_pretrained(folder)
    elif s.info is not None:
        (folder / "model.json").write_text(json.dumps(s.info, indent=2))


def reload_logits(fmt: str, s: Student, folder: Path) -> np.ndarray:
    """Logits of the export as read back from disk, on the student's held-out inputs."""
    if fmt in ("onnx", "onnx-int8"):
        from distill.export.onnx import onnx_logits

        return onnx_logits(folder / "model.onnx", s.inputs)
    if fmt == "int8":
        from distill.export.quantize import load_int8

        return torch_logits(load_int8(folder), s)
    from distill.models.causal_lm import load_causal_lm

    if fmt == "safetensors":
        if s.kind == "causal_lm":
            return torch_logits(load_causal_lm(folder)[0], s)
        from distill.models.classifiers import load_classifier
        from distill.recipe import ModelSpec

        spec = ModelSpec(**s.info["model"])
        model = load_classifier(folder / "model.safetensors", spec, tuple(s.info["input_shape"]), s.info["num_classes"])
        return torch_logits(model, s)
    with tempfile.TemporaryDirectory() as cache:  # transformers dequantises the GGUF into a throwaway HF folder
        return torch_logits(load_causal_lm(folder / "model.gguf", cache_dir=Path(cache))[0], s)


@torch.inference_mode()
def torch_logits(model: nn.Module, s: Student) -> np.ndarray:
    model.eval()
    x = torch.from_numpy(s.inputs)
    out = model(input_ids=x, use_cache=False).logits if s.kind == "causal_lm" else model(x)
    return out.float().numpy()


def check_export(fmt: str, s: Student, folder: Path) -> dict:
    """Compare the reloaded export with the student; raise DistillError (the caller deletes it) if it is off."""
    reference = torch_logits(s.model, s)
    got = reload_logits(fmt, s, folder)
    unit = "token positions" if s.kind == "causal_lm" else "test examples"
    if got.shape != reference.shape:
        raise DistillError(
            f"{fmt} export gives logits of shape {got.shape}, the student {reference.shape}; nothing was written"
        )
    if s.kind == "causal_lm":  # real tokens only, real vocabulary rows only (padded rows are never trained)
        vocab = len(s.tokenizer)
        reference, got = reference[s.mask][:, :vocab], got[s.mask][:, :vocab]
    diff = float(np.abs(reference.astype(np.float64) - got).max())
    scale = max(float(np.abs(reference).max()), 1.0)
    agreement = float((reference.argmax(-1) == got.argmax(-1)).mean())
    figures = {
        "file_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(MODEL_FILES)),
        "student_bytes": (s.folder / "model.safetensors").stat().st_size,
        "max_abs_logit_diff": diff,
        "top1_agreement": agreement,
        "compared": int(len(reference)),
        "compared_unit": unit,
    }
    where = f"on {len(reference)} held-out {unit}; nothing was written"
    lossy = MIN_AGREEMENT_LOSSY_LM if s.kind == "causal_lm" else MIN_AGREEMENT_LOSSY
    minimum = MIN_AGREEMENT.get(fmt, lossy)
    if not agreement >= minimum:
        raise DistillError(
            f"{fmt} export failed its check: top-1 agreement with the student {agreement:.4f} < {minimum} {where}"
        )
    tolerance = MAX_RELATIVE_DIFF.get(fmt)
    if tolerance is not None and not diff <= tolerance * scale:
        raise DistillError(
            f"{fmt} export failed its check: max |logit diff| {diff:.3g} > {tolerance:g} x {scale:.3g} "
            f"(largest |logit|) {where}"
        )
    return figures


def summary(result: dict) -> str:
    ratio = result["file_bytes"] / result["student_bytes"]
    return (
        f"{result['format']}: {result['path']} ({result['file_bytes']:,} bytes, {ratio:.2f}x the fp32 student); "
        f"max |logit diff| {result['max_abs_logit_diff']:.2e}, top-1 agreement {result['top1_agreement']:.2%} "
        f"over {result['compared']} held-out {result['compared_unit']}"
    )
