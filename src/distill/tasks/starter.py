"""`distill init TASK --teacher PATH --data PATH`: a commented starting recipe for a user's own teacher and data.

The recipe is the task's defaults written out with a comment on each choice, the data source read from what the
data folder holds; it is validated by the task's schema before it is written, so `distill run` accepts it. Sizes
and budgets are starting points to edit; the distillation settings of the classifier tasks are ``auto`` (chosen on
the validation split), the protocol bench/robustness.py runs on every data set we have.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from distill.errors import DistillError
from distill.io import atomic_path
from distill.tasks import parse_recipe


def _q(value: Path | str) -> str:
    """``value`` as a YAML double-quoted scalar, so it reads back as the same string: written plain, ``my data #1``
    is cut at the comment, ``a: b`` does not parse and ``2024`` or ``yes`` read back as a number or a boolean."""
    return yaml.safe_dump(str(value), default_style='"', allow_unicode=True, width=math.inf).removesuffix("\n")


def _source(data: Path, task: str) -> str:
    """The ``data.source`` of a path, read from what it holds."""
    if task == "causal_lm":
        return "jsonl" if data.suffix == ".jsonl" else "text"
    if data.is_dir():
        found = {p.name for p in data.iterdir()}
        if task == "classification":
            if "train.csv" in found:
                return "csv"
            if "train_x.npy" in found:
                return "npy"
            if any(name.startswith("train-images") for name in found):
                return "mnist"
        elif "train.csv" in found:
            return "csv"
        elif "train.jsonl" in found:
            return "jsonl"
    wanted = {
        "classification": "train.csv + test.csv, {train,test}_{x,y}.npy or MNIST idx files",
        "text_classification": "train.csv + test.csv or train.jsonl + test.jsonl",
        "embedding": "train.csv + test.csv or train.jsonl + test.jsonl",
    }[task]
    raise DistillError(f"--data {data}: cannot tell what it holds; a {task} recipe reads a folder with {wanted}")


def _classification(teacher: Path | None, data: Path) -> str:
    checkpoint = f"  checkpoint: {_q(teacher)}  # your trained teacher's weights\n" if teacher else ""
    return f"""# A classifier distilled into a smaller one (written by distill init; every key is optional).
task: classification
name: {_q(data.name)}
seed: 0
data:
  source: {_source(data, "classification")}
  path: {_q(data)}
  labeled_fraction: 1.0     # the share of training labels you have; the rest is unlabeled transfer data
  validation_fraction: 0.1  # labeled examples held out: every stage is validated there, the teacher checked
teacher:
{checkpoint}  model: {{arch: mlp, hidden: [1200, 1200], dropout: 0.5}}  # the architecture of the teacher
  train: {{epochs: 8, batch_size: 128, lr: 0.1}}
student:
  model: {{arch: mlp, hidden: [800, 800]}}  # the small model you want
  train: {{epochs: 4, batch_size: 128, lr: 0.1, patience: 3}}  # stops when validation stops improving
distill:
  # auto: a short sweep on the validation split picks them (T 1/2/4/8, then alpha 0/0.1/0.5; RUN/auto.json and the
  # report show the table). Put the chosen numbers here to skip the sweep on later runs.
  temperature: auto  # softer teacher distributions carry more of what it knows about the other classes
  alpha: auto        # weight of the hard labels next to the soft ones
"""


def _causal_lm(teacher: Path, data: Path) -> str:
    return f"""# A causal LM distilled into one cut from its own layers (written by distill init).
task: causal_lm
name: {_q(data.stem)}
data:
  source: {_source(data, "causal_lm")}  # text: packed blocks; jsonl: prompt/response pairs
  path: {_q(data)}
  block_size: 256
teacher:
  path: {_q(teacher)}  # an HF folder or a .gguf file
student:
  from_teacher: {{keep: 6}}  # the student keeps 6 of the teacher's layers, evenly spaced
  train: {{epochs: 1, batch_size: 8, optimizer: adamw, lr: 5.0e-4}}
distill:
  signal: cache  # the teacher runs once over the data (distill cache); live: it runs beside the student
  temperature: 1
"""


def _text_classification(teacher: Path, data: Path) -> str:
    return f"""# Text classification by soft labels: a sentence-encoder teacher + a probe label the texts, a smaller
# encoder learns from them (written by distill init).
task: text_classification
name: {_q(data.name)}
data:
  source: {_source(data, "text_classification")}
  path: {_q(data)}
  labeled_fraction: 1.0     # the share of labels you have; the rest is unlabeled transfer data
  validation_fraction: 0.1  # labeled texts held out: the students are validated there, the teacher checked
  max_length: 128
teacher:
  path: {_q(teacher)}  # a sentence-transformers / HF encoder folder
student:
  from_teacher: {{keep: 2}}  # the student keeps 2 of the teacher's layers
  # lr auto: a short sweep (1e-4, 3e-4, 1e-3) for the baseline and, before T and alpha, for the distilled student
  train: {{epochs: 3, batch_size: 32, optimizer: adamw, lr: auto}}
distill:
  # auto: a short sweep on the validation split picks them (RUN/auto.json); numbers here skip it
  temperature: auto
  alpha: auto
"""


def _embedding(teacher: Path, data: Path) -> str:
    return f"""# A smaller sentence encoder that embeds like the teacher (written by distill init).
task: embedding
name: {_q(data.name)}
data:
  - source: {_source(data, "embedding")}
    path: {_q(data)}
    max_length: 128
    validation_fraction: 0.1  # training texts held out: the student is validated there (loss, cosine)
teacher:
  path: {_q(teacher)}  # a sentence-transformers / HF encoder folder
student:
  from_teacher: {{keep: 2}}
  train: {{epochs: 3, batch_size: 32, optimizer: adamw, lr: 1.0e-4}}
distill:
  loss: mse
"""


TEMPLATES = {
    "classification": _classification,
    "causal_lm": _causal_lm,
    "text_classification": _text_classification,
    "embedding": _embedding,
}


def write_starter(task: str, teacher: Path | None, data: Path, out: Path, *, force: bool = False) -> Path:
    """Write the starting recipe of ``task`` for ``teacher`` and ``data`` to ``out`` (validated first)."""
    if task not in TEMPLATES:
        raise DistillError(f"distill init: unknown task {task!r}; choose one of {', '.join(TEMPLATES)}")
    if teacher is None and task != "classification":
        raise DistillError(f"distill init {task} needs --teacher PATH (the model to distil)")
    for what, path in (("--teacher", teacher), ("--data", data)):
        if path is not None and not path.exists():
            raise DistillError(f"{what} {path} does not exist")
    if out.exists() and not force:
        raise DistillError(f"{out} already exists; pass --force to replace it")
    resolved = None if teacher is None else teacher.expanduser().resolve()
    text = TEMPLATES[task](resolved, data.expanduser().resolve())
    parse_recipe(yaml.safe_load(text), str(out))  # what init writes always validates
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
