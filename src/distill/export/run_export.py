"""``distill export``: write a student in a deployable format, then reload it from disk and check it against
the student on held-out data before calling it done. A failed check leaves nothing behind. Each task loads its
own student (``tasks/<task>.py``: ``load_student``) and says which formats it can take (the ``TASKS`` table).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.devices import to_numpy
from distill.errors import DistillError
from distill.io import STAGE_DONE, atomic_dir, write_json

# gguf-q4_0 ... gguf-q5_1 keep the token embedding and output matrix in q8_0 (distill.models.gguf_grid.grid_types).
GGUF = ("gguf-f16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1")
FORMATS = ("safetensors", "int8", "onnx", "onnx-int8", *GGUF)
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
    """A finished student as its task loads it for export: the model, its folder, held-out inputs to check the
    export on, and what rebuilds it from an exported folder."""

    kind: str  # "classifier", "causal_lm", "text_classifier" or "sentence_encoder"
    model: nn.Module
    folder: Path
    inputs: np.ndarray  # held-out features (float32) or token ids (int64)
    mask: np.ndarray | None = None  # token inputs: real (non-padding) positions
    info: dict | None = None  # classifier: model.json (what rebuilds it)
    tokenizer: object = None
    calibration: np.ndarray | None = None  # causal_lm: training blocks that int8 smoothing is calibrated on
    reload: Callable[[Path], nn.Module] | None = None  # the safetensors export read back as a model


def export_student(student: Student, fmt: str, target: Path, run_dir: Path, *, force: bool = False) -> dict:
    """Export ``student`` as ``fmt`` into ``target`` and return the check's figures, also written to
    ``RUN/exports/<fmt>.json``. A failed check leaves nothing behind."""
    target = Path(target)
    check_target(target, fmt, Path(run_dir), force=force)
    with atomic_dir(target) as tmp:  # a failed check raises: the temp folder goes, the target stays as it was
        write_json(tmp / EXPORT_MARK, {"format": fmt})
        write_export(fmt, student, tmp)
        figures = check_export(fmt, student, tmp)
        if fmt in GGUF:  # q8_0 keeps a matrix whose rows are not a multiple of 32 in F16: say how many
            from distill.export.gguf import matrix_types

            figures["matrix_types"] = matrix_types(tmp / "model.gguf")
    result = {"format": fmt, "path": str(target), **figures}
    write_json(Path(run_dir) / "exports" / f"{fmt}.json", result)
    return result


EXPORT_MARK = ".distill-export.json"  # in every export folder: what --force may replace


def check_target(target: Path, fmt: str, run_dir: Path, *, force: bool) -> None:
    """An export goes to a folder of its own: never the run folder, a folder holding it, or what the run holds (a
    stage folder, its files; ``RUN/exports/`` and new folders in the run are fine). An existing target is replaced
    (with ``force``) only when it is an earlier export of the same format (its ``EXPORT_MARK``; ``RUN/exports/<fmt>``
    also when written before the mark was) or an empty folder: ``--force`` never deletes what distill did not
    write."""
    resolved, run = target.resolve(), run_dir.resolve()
    if run.is_relative_to(resolved):
        raise DistillError(
            f"export target {target} is or holds the run folder {run_dir}; choose a folder of its own, "
            f"e.g. {run_dir / 'exports' / fmt}"
        )
    if resolved.is_relative_to(run):  # a new folder in the run, or under exports/; never into what the run holds
        top = run / resolved.relative_to(run).parts[0]
        if top.name != "exports" and top.exists() and not (top == resolved and (top / EXPORT_MARK).is_file()):
            raise DistillError(
                f"export target {target} is or is inside {top.name}, part of the run {run_dir}; choose a new folder, "
                f"e.g. {run_dir / 'exports' / fmt}"
            )
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir() or target.is_symlink():
        raise DistillError(f"export target {target} exists and is not a folder; choose a folder for the export")
    if not force:
        raise DistillError(f"export target {target} already exists; pass --force to replace it")
    try:
        mark = json.loads((target / EXPORT_MARK).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        mark = fmt if resolved == run / "exports" / fmt else None  # the default place: an export of ours
    if mark != fmt and any(target.iterdir()):
        what = f"a {mark} export" if mark else "not an export written by distill"
        raise DistillError(
            f"--force replaces only an earlier {fmt} export, and {target} is {what}; choose another --out, or empty "
            "that folder yourself"
        )


def model_type(student_folder: Path) -> str:
    """The ``model_type`` of an HF student folder's config ("unknown" without one)."""
    config = student_folder / "config.json"
    return json.loads(config.read_text()).get("model_type", "unknown") if config.is_file() else "unknown"


def write_export(fmt: str, s: Student, folder: Path) -> None:
    lm = s.kind == "causal_lm"
    if fmt == "safetensors":  # the student's own files, byte for byte (the HF folder for an LM)
        shutil.copytree(s.folder, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint.*", STAGE_DONE))
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
        example = {name: torch.from_numpy(np.resize(value, (2, *value.shape[1:]))) for name, value in
                   onnx_inputs(s).items()}  # fmt: skip
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
    if s.tokenizer is not None:  # int8 and ONNX models of texts need the tokenizer beside them to be usable
        s.tokenizer.save_pretrained(folder)
    elif s.info is not None:
        (folder / "model.json").write_text(json.dumps(s.info, indent=2))


def reload_logits(fmt: str, s: Student, folder: Path) -> np.ndarray:
    """Logits of the export as read back from disk, on the student's held-out inputs."""
    if fmt in ("onnx", "onnx-int8"):
        from distill.export.onnx import onnx_logits

        return onnx_logits(folder / "model.onnx", onnx_inputs(s))
    if fmt == "int8":
        from distill.export.quantize import load_int8

        return torch_logits(load_int8(folder), s)
    if fmt == "safetensors":
        return torch_logits(s.reload(folder), s)
    from distill.models.causal_lm import load_causal_lm

    with tempfile.TemporaryDirectory() as cache:  # transformers dequantises the GGUF into a throwaway HF folder
        return torch_logits(load_causal_lm(folder / "model.gguf", cache_dir=Path(cache))[0], s)


TEXT_KINDS = ("text_classifier", "sentence_encoder")  # models of (input_ids, attention_mask)


def onnx_inputs(s: Student) -> dict[str, np.ndarray]:
    """The student's held-out inputs by the names its ONNX graph takes."""
    if s.kind == "causal_lm":
        return {"input_ids": s.inputs}
    if s.kind in TEXT_KINDS:
        return {"input_ids": s.inputs, "attention_mask": s.mask.astype(np.int64)}
    return {"input": s.inputs}


@torch.inference_mode()
def torch_logits(model: nn.Module, s: Student) -> np.ndarray:
    model.eval()
    x = torch.from_numpy(s.inputs)
    if s.kind == "causal_lm":
        out = model(input_ids=x, use_cache=False).logits
    elif s.kind in TEXT_KINDS:
        out = model(x, torch.from_numpy(s.mask).long())
    else:
        out = model(x)
    return to_numpy(out.float())


def check_export(fmt: str, s: Student, folder: Path) -> dict:
    """Compare the reloaded export with the student; raise DistillError (the caller deletes it) if it is off."""
    reference = torch_logits(s.model, s)
    got = reload_logits(fmt, s, folder)
    unit = {"causal_lm": "token positions", "sentence_encoder": "texts (cosine >= 0.999)"}.get(s.kind, "test examples")
    if got.shape != reference.shape:
        raise DistillError(
            f"{fmt} export gives logits of shape {got.shape}, the student {reference.shape}; nothing was written"
        )
    if s.kind == "causal_lm":  # real tokens only, real vocabulary rows only (padded rows are never trained)
        vocab = len(s.tokenizer)
        reference, got = reference[s.mask][:, :vocab], got[s.mask][:, :vocab]
    diff = float(np.abs(reference.astype(np.float64) - got).max())
    scale = max(float(np.abs(reference).max()), 1.0)
    if s.kind == "sentence_encoder":  # embeddings have no top-1: a row agrees when its direction is kept
        agreement = float((cosine(reference, got) >= 0.999).mean())
    else:
        agreement = float((reference.argmax(-1) == got.argmax(-1)).mean())
    figures = {
        "file_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(MODEL_FILES)),
        "student_bytes": sum(f.stat().st_size for f in s.folder.glob("*.safetensors")),
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


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def summary(result: dict) -> str:
    ratio = result["file_bytes"] / result["student_bytes"]
    return (
        f"{result['format']}: {result['path']} ({result['file_bytes']:,} bytes, {ratio:.2f}x the fp32 student); "
        f"max |logit diff| {result['max_abs_logit_diff']:.2e}, top-1 agreement {result['top1_agreement']:.2%} "
        f"over {result['compared']} held-out {result['compared_unit']}{f16_note(result)}"
    )


def f16_note(result: dict) -> str:
    """For a q8_0 GGUF that kept some matrices in F16 (rows not a multiple of 32 values), how many."""
    types = result.get("matrix_types") or {}
    if result["format"] != "gguf-q8_0" or not types.get("F16"):
        return ""
    return (
        f"; {types['F16']} of {sum(types.values())} matrices kept in F16 (rows not a multiple of 32 values: "
        "q8_0 cannot pack them)"
    )
