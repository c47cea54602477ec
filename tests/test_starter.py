"""`distill init`: a commented starting recipe per task that validates, and one line for what it cannot use."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from test_cli import distill

from distill.errors import DistillError
from distill.tasks import load_recipe, task_of
from distill.tasks.starter import write_starter


@pytest.fixture
def folders(tmp_path):
    npy = tmp_path / "npy"
    npy.mkdir()
    for split in ("train", "test"):
        np.save(npy / f"{split}_x.npy", np.zeros((4, 3), dtype=np.float32))
        np.save(npy / f"{split}_y.npy", np.zeros(4, dtype=np.int64))
    csv = tmp_path / "texts"
    csv.mkdir()
    for split in ("train", "test"):
        (csv / f"{split}.csv").write_text("text,label\na b,x\nc d,y\n")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    return tmp_path


@pytest.mark.parametrize(
    ("task", "teacher", "data", "source"),
    [
        ("classification", None, "npy", "npy"),
        ("causal_lm", "teacher", "corpus.jsonl", "jsonl"),
        ("text_classification", "teacher", "texts", "csv"),
        ("embedding", "teacher", "texts", "csv"),
    ],
)
def test_init_writes_a_commented_recipe_that_validates(folders, task, teacher, data, source):
    out = folders / f"{task}.yaml"
    write_starter(task, teacher and folders / teacher, folders / data, out)
    text = out.read_text()
    assert text.startswith("# ") and "  # " in text  # commented
    recipe = load_recipe(out)
    assert task_of(recipe) == task
    raw = yaml.safe_load(text)
    sources = [raw["data"]] if isinstance(raw["data"], dict) else raw["data"]
    assert sources[0]["source"] == source and sources[0]["path"] == str((folders / data).resolve())


def test_init_bad_inputs_are_one_line(folders):
    with pytest.raises(DistillError, match="unknown task 'regression'"):
        write_starter("regression", None, folders / "npy", folders / "r.yaml")
    with pytest.raises(DistillError, match="causal_lm needs --teacher PATH"):
        write_starter("causal_lm", None, folders / "corpus.jsonl", folders / "r.yaml")
    with pytest.raises(DistillError, match="--data .*nowhere does not exist"):
        write_starter("classification", None, folders / "nowhere", folders / "r.yaml")
    with pytest.raises(DistillError, match="cannot tell what it holds"):
        write_starter("classification", None, folders / "teacher", folders / "r.yaml")
    write_starter("classification", None, folders / "npy", folders / "r.yaml")
    with pytest.raises(DistillError, match="already exists; pass --force"):
        write_starter("classification", None, folders / "npy", folders / "r.yaml")
    result = distill("init", "embedding", "--data", folders / "texts", "--out", folders / "e.yaml")
    assert result.returncode == 2 and "needs --teacher PATH" in result.stderr
    assert not (folders / "e.yaml").exists()
    done = distill("init", "classification", "--data", folders / "npy", "--out", folders / "c.yaml")
    assert done.returncode == 0 and "wrote" in done.stdout


@pytest.mark.parametrize(("task", "data"), [("classification", "npy"), ("text_classification", "texts")])
def test_init_leaves_the_distillation_settings_to_the_validation_sweep(folders, task, data):
    out = folders / f"{task}.yaml"
    write_starter(task, folders / "teacher", folders / data, out)
    recipe = load_recipe(out)
    assert recipe.distill.auto_keys == ["temperature", "alpha"] and recipe.data.validation_fraction > 0


@pytest.mark.parametrize("name", ["my data #1", "a: b", "2024", "yes", "null", 'it\'s "q" ü', "- [x]"])
def test_init_quotes_paths_so_every_folder_name_reads_back_as_itself(tmp_path, name):
    """Written plain, `my data #1` read back as `my data` (another folder), `a: b` did not parse and `2024` or
    `yes` became a number or a boolean."""
    data, teacher = tmp_path / name, tmp_path / f"teacher {name}"
    data.mkdir()
    teacher.mkdir()
    for split in ("train", "test"):
        np.save(data / f"{split}_x.npy", np.zeros((4, 3), dtype=np.float32))
        np.save(data / f"{split}_y.npy", np.zeros(4, dtype=np.int64))
        (data / f"{split}.csv").write_text("text,label\na b,x\nc d,y\n")
    (tmp_path / f"{name}.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    checkpoint = teacher / "model.safetensors"
    checkpoint.touch()
    recipe = load_recipe(write_starter("classification", checkpoint, data, tmp_path / "c.yaml"))
    assert (recipe.name, recipe.data.path, recipe.teacher.checkpoint) == (name, str(data), str(checkpoint))
    recipe = load_recipe(write_starter("causal_lm", teacher, tmp_path / f"{name}.jsonl", tmp_path / "lm.yaml"))
    assert (recipe.name, recipe.data.path, recipe.teacher.path) == (name, f"{data}.jsonl", str(teacher))
    recipe = load_recipe(write_starter("embedding", teacher, data, tmp_path / "e.yaml"))
    assert (recipe.name, recipe.data[0].path, recipe.teacher.path) == (name, str(data), str(teacher))
    assert "  # " in (tmp_path / "e.yaml").read_text()  # the comments are kept


def test_the_lm_starter_prunes_by_importance_and_adapts_the_teacher_where_it_helps(folders):
    """Issue 35.1: `distill init causal_lm` no longer cuts evenly spaced layers (the worst start measured): it prunes
    half the block weights by depth importance and adapts the teacher, kept only where it helps."""
    recipe = load_recipe(write_starter("causal_lm", folders / "teacher", folders / "corpus.jsonl", folders / "lm.yaml"))
    assert recipe.student.from_teacher is None and recipe.student.prune.params == 0.5
    assert recipe.student.prune.axes == ["depth"]
    assert recipe.teacher.train is not None and recipe.teacher.adapt == "auto" and recipe.mixed_precision == "auto"


def test_text_init_chooses_the_teacher_from_what_it_is_and_the_labels(tmp_path, teacher_dir, bert_tok):
    """Issue 36.2: a sequence-classification folder is used as it is; an encoder is fine-tuned when the data has
    >= 8 labels per class on average, else probed; the comment above the teacher says which and why."""
    from transformers import BertForSequenceClassification

    from distill.tasks.text_classification import TRAIN_TEACHER_LABELS_PER_CLASS

    def texts(folder, per_class):
        folder.mkdir()
        rows = "".join(f"text {i},{label}\n" for i in range(per_class) for label in ("x", "y"))
        for split in ("train", "test"):
            (folder / f"{split}.csv").write_text("text,label\n" + rows)
        return folder

    many, few = texts(tmp_path / "many", TRAIN_TEACHER_LABELS_PER_CLASS), texts(tmp_path / "few", 3)
    fine = load_recipe(write_starter("text_classification", teacher_dir, many, tmp_path / "fine.yaml"))
    assert fine.teacher.train is not None and not fine.teacher.probe
    assert "# teacher: the encoder fine-tuned" in (tmp_path / "fine.yaml").read_text()
    probe = load_recipe(write_starter("text_classification", teacher_dir, few, tmp_path / "probe.yaml"))
    assert probe.teacher.probe and probe.teacher.train is None
    assert "3.0 per class (< 8)" in (tmp_path / "probe.yaml").read_text()
    classifier = tmp_path / "classifier"
    from text_fixtures import tiny_bert

    config = tiny_bert(bert_tok).config
    config.num_labels, config.id2label = 2, {0: "x", 1: "y"}
    BertForSequenceClassification(config).save_pretrained(classifier)
    bert_tok.save_pretrained(classifier)
    used = load_recipe(write_starter("text_classification", classifier, few, tmp_path / "used.yaml"))
    assert used.teacher.train is None and not used.teacher.probe
    assert "used as it is" in (tmp_path / "used.yaml").read_text()
