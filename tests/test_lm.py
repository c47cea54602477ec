"""The causal-LM recipe: token-weighted losses against independent references, and whole runs on tiny models."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lm_fixtures
import numpy as np
import pytest
import torch
import yaml
from lm_fixtures import save_tiny, tiny_llama, tiny_tokenizer
from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

from distill.data.token_blocks import TokenData
from distill.errors import DistillError
from distill.evaluate import lm_validation
from distill.losses.sparse import SparseTargets, sparse_targets_from_logits
from distill.models.causal_lm import load_causal_lm
from distill.models.cut import student_from_teacher
from distill.recipe import LMDistillSpec, TrainSpec
from distill.tasks import load_recipe
from distill.tasks.causal_lm import LMBatches, load_student, setup, with_student
from distill.tasks.causal_lm import run as run_lm
from distill.tasks.checks import memorised_teacher_warnings
from distill.teachers.identity import lm_id
from distill.teachers.lm_signals import LiveLMSignal, SparseSignal
from distill.teachers.onpolicy import OnPolicyBatches
from distill.train import make_accelerator, native_bf16, train_loop

TEXT = " ".join(
    f"the {a} {b} of the {c} is {d} and {e}."
    for a, b, c, d, e in zip(
        ["quick", "lazy", "old", "young", "wise"] * 40,
        ["fox", "dog", "king", "queen", "fool"] * 40,
        ["realm", "house", "field", "sea", "sky"] * 40,
        ["bright", "dark", "calm", "loud", "still"] * 40,
        ["free", "bound", "kind", "cruel", "true"] * 40,
        strict=True,
    )
)


def token_data(tok, blocks: int = 6, seq: int = 12, seed: int = 0) -> TokenData:
    """Blocks with prompts and padding masked: each block trains on a different number of tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, len(tok), size=(blocks, seq)).astype(np.int32)
    labels = ids.astype(np.int64)
    attention = np.ones_like(ids, dtype=np.int8)
    for b in range(blocks):
        prompt, pad = b % 4, (2 * b) % 5
        labels[b, :prompt] = -100
        if pad:
            labels[b, seq - pad :] = -100
            attention[b, seq - pad :] = 0
            ids[b, seq - pad :] = tok.pad_token_id
    return TokenData(input_ids=ids, labels=labels, attention_mask=attention)


def reference_kl(student, teacher, data: TokenData, vocab: int) -> float:
    """Float64 forward KL per distilled token from materialised logits (the plain computation)."""
    ids = torch.from_numpy(data.input_ids).long()
    attention = torch.from_numpy(data.attention_mask).long()
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=attention).logits[:, :-1, :vocab].double()
        t = teacher(input_ids=ids, attention_mask=attention).logits[:, :-1, :vocab].double()
    mask = torch.from_numpy(data.labels[:, 1:] != -100)
    log_s, log_t = s.log_softmax(-1)[mask], t.log_softmax(-1)[mask]
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()


def test_hard_label_loss_equals_transformers_cross_entropy(tok):
    model = tiny_llama(tok, layers=2, seed=0)
    data = token_data(tok)
    batches = LMBatches(data, vocab_size=len(tok), chunk_size=5)
    terms = batches.loss(model, torch.arange(len(data)), torch.device("cpu"))
    ids = torch.from_numpy(data.input_ids).long()
    with torch.no_grad():  # float64 reference; padded vocab rows (304 > 300 tokens) get no probability
        logits = model(input_ids=ids, attention_mask=torch.from_numpy(data.attention_mask).long()).logits
    log_p = logits[:, :-1, : len(tok)].double().log_softmax(-1)
    targets = torch.from_numpy(data.labels[:, 1:])
    mask = targets != -100
    expected = -log_p[mask].gather(-1, targets[mask][:, None]).mean().float()
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)


def test_live_distillation_loss_matches_float64_reference(tok):
    teacher, student = tiny_llama(tok, layers=3, seed=1), tiny_llama(tok, layers=2, seed=2)
    data = token_data(tok)
    spec = LMDistillSpec(temperature=1.0, signal="live")
    signal = LiveLMSignal(teacher, spec.loss, spec.temperature)
    batches = LMBatches(data, vocab_size=len(tok), chunk_size=7, distill=spec, signal=signal)
    terms = batches.loss(student, torch.arange(len(data)), torch.device("cpu"))
    assert terms["loss"].item() == pytest.approx(reference_kl(student, teacher, data, len(tok)), rel=1e-4)
    assert "ce" not in terms  # alpha = 0: no hard-label pass


def signal_batches(signal: str, data: TokenData, tok, teacher) -> LMBatches | OnPolicyBatches:
    """The micro-batch source of each teacher signal over ``data``: hard labels, the live teacher, stored sampled
    targets (the cache), recorded top-k targets scoring only some trained positions, on-policy samples."""
    vocab = len(tok)
    if signal == "onpolicy":  # greedy samples: the same completions whatever rows share a micro-batch
        return OnPolicyBatches(data, teacher, vocab, lam=1.0, max_new_tokens=4, temperature=0.0, chunk_size=4)
    spec = LMDistillSpec(signal="live" if signal == "live" else "cache", alpha=0.3, temperature=2.0)
    if signal == "hard":
        return LMBatches(data, vocab_size=vocab, chunk_size=4)
    if signal == "live":
        return LMBatches(data, vocab, 4, spec, LiveLMSignal(teacher, spec.loss, spec.temperature))
    ids = torch.from_numpy(data.input_ids).long()
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=torch.from_numpy(data.attention_mask).long()).logits
    mode = "sampled" if signal == "cache" else "topk"
    targets = sparse_targets_from_logits(
        logits, mode=mode, k=4, temperature=2.0, vocab_size=vocab, generator=torch.Generator().manual_seed(0)
    )
    scored = None if signal == "cache" else torch.from_numpy(data.labels != -100).roll(-1, 1)
    if scored is not None:
        scored[:, ::3] = False  # the teacher scored only some of the trained positions

    def lookup(rows, epoch):
        picked = SparseTargets(*(None if t is None else t[rows] for t in (targets.ids, targets.logp, targets.tail)))
        return picked, None if scored is None else scored[rows]

    return LMBatches(data, vocab, 4, spec, SparseSignal(lookup, 2.0))


@pytest.mark.parametrize("signal", ["hard", "live", "cache", "recorded", "onpolicy"])
def test_gradient_is_token_weighted_whatever_the_accumulation(tok, tmp_path, signal):
    """One step over a global batch gives the same weights with grad_accum 1 and 3 (blocks weigh differently),
    for every teacher signal (issue 17.4: recorded and on-policy terms were divided by their own counts)."""
    data = token_data(tok, blocks=6)
    data.labels[:, :2] = -100  # every row has a prompt for the on-policy student to complete
    teacher = tiny_llama(tok, layers=2, seed=9)
    results = []
    for accum in (1, 3):
        model = tiny_llama(tok, layers=2, seed=3)
        spec = TrainSpec(epochs=1, batch_size=6, grad_accum=accum, optimizer="sgd", lr=0.5, momentum=0.0)
        batches = signal_batches(signal, data, tok, teacher)
        trained = train_loop(f"a{accum}", model, spec, batches, tmp_path, make_accelerator(), seed=0)
        results.append(torch.cat([p.detach().flatten() for p in trained.parameters()]))
    assert not torch.equal(results[0], torch.cat([p.flatten() for p in tiny_llama(tok, layers=2, seed=3).parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_a_model_that_scales_its_logits_is_distilled_on_the_logits_it_outputs(tok):
    """Issue 17.9: Granite divides its logits by ``logits_scaling`` (Cohere multiplies by ``logit_scale``): the
    chunked losses fold that into the head, so they match the model's own outputs."""
    torch.manual_seed(0)
    config = GraniteConfig(**lm_fixtures._common(tok, 2), logits_scaling=4.0, tie_word_embeddings=False)
    student, teacher = GraniteForCausalLM(config).eval(), GraniteForCausalLM(config).eval()
    data = token_data(tok)
    spec = LMDistillSpec(temperature=1.0, signal="live")
    batches = LMBatches(data, len(tok), 7, spec, LiveLMSignal(teacher, spec.loss, spec.temperature))
    terms = batches.loss(student, torch.arange(len(data)), torch.device("cpu"))
    assert terms["loss"].item() == pytest.approx(reference_kl(student, teacher, data, len(tok)), rel=1e-4)
    hard = LMBatches(data, vocab_size=len(tok), chunk_size=5).loss(student, torch.arange(len(data)), "cpu")
    ids, attention = torch.from_numpy(data.input_ids).long(), torch.from_numpy(data.attention_mask).long()
    with torch.no_grad():
        log_p = student(input_ids=ids, attention_mask=attention).logits[:, :-1, : len(tok)].double().log_softmax(-1)
    targets = torch.from_numpy(data.labels[:, 1:])
    mask = targets != -100
    expected = -log_p[mask].gather(-1, targets[mask][:, None]).mean().float()
    torch.testing.assert_close(hard["loss"].detach(), expected, rtol=1e-5, atol=1e-6)


def test_logit_softcapping_is_refused_in_one_line(tok, tmp_path):
    """Gemma 2+ soft-caps its final logits, which the chunked losses do not apply: refused, not mis-trained."""
    path, raw = write_recipe(tmp_path, tok, "live")
    torch.manual_seed(0)
    config = Gemma2Config(**lm_fixtures._common(tok, 2), head_dim=8, final_logit_softcapping=30.0)
    save_tiny(Gemma2ForCausalLM(config), tok, tmp_path / "teacher")
    with pytest.raises(DistillError, match="teacher soft-caps its final logits.*use distill.signal: cache"):
        run_lm(load_recipe(path), tmp_path / "run")
    raw["student"] = {"path": str(tmp_path / "teacher"), "train": raw["student"]["train"]}
    raw["teacher"] = {"path": str(save_tiny(tiny_llama(tok, layers=2), tok, tmp_path / "llama"))}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DistillError, match="student soft-caps its final logits"):
        run_lm(load_recipe(path), tmp_path / "run2")


def write_recipe(tmp_path, tok, signal: str, **extra) -> tuple:
    teacher_dir = tmp_path / "teacher"
    save_tiny(tiny_llama(tok, layers=4, seed=0), tok, teacher_dir)
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    raw = {
        "task": "causal_lm",
        "name": "tiny",
        "data": {"source": "text", "path": str(text), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(teacher_dir)},
        "student": {
            "from_teacher": {"keep": 2},
            "train": {"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 3e-3, "log_every": 1},
        },
        "distill": {"signal": signal, "cache_k": 8, "chunk_size": 32},
        "eval": {"batch_size": 4, "threads": 1},
        **extra,
    }
    path = tmp_path / f"{signal}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


@pytest.mark.on_accelerator  # every model output behaves as a GPU tensor (tests/accelerator_sim.py)
@pytest.mark.parametrize("signal", ["cache", "live"])
def test_run_compares_teacher_init_baseline_and_distilled_student(tok, tmp_path, signal):
    path, _ = write_recipe(tmp_path, tok, signal)
    metrics = run_lm(load_recipe(path), tmp_path / "run")
    models = metrics["models"]
    assert list(models) == ["teacher", "student_init", "baseline", "student", "student_int8"]
    teacher = models["teacher"]
    assert teacher["agreement_with_teacher"] is None and teacher["parameters"] > models["student"]["parameters"]
    for name in ("student_init", "baseline", "student"):
        assert 0.0 <= models[name]["agreement_with_teacher"] <= 1.0 and models[name]["kl_to_teacher"] >= 0.0
    # Soft labels keep the student near the teacher; plain cross-entropy pulls it towards the text instead.
    assert models["student"]["kl_to_teacher"] < models["baseline"]["kl_to_teacher"]
    assert models["baseline"]["perplexity"] < models["student_init"]["perplexity"]
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()
    report = (tmp_path / "run" / "REPORT.md").read_text()
    precision = metrics["machine"]["precision"]  # the default `auto`, resolved for this CPU, said in both
    assert precision.startswith("bf16 (auto" if native_bf16() else "float32 (auto") and precision in report
    assert "perplexity" in report and "student before training" in report
    if signal == "cache":
        caches = list((tmp_path / "run" / "cache").iterdir())
        assert len(caches) == 1 and (caches[0] / "meta.json").exists()
        assert caches[0].name.endswith("sampled8x2-T1")  # a set of draws per epoch the student trains


def test_each_epoch_reads_its_own_set_of_cached_draws_and_a_resumed_epoch_too(tok, tmp_path, monkeypatch):
    """Issue 19.4: the loop tells the batches each epoch (set_epoch); the sampled cache gives that epoch's draws."""
    from distill.teachers.lm_cache import LMCache

    read = []
    lookup = LMCache.lookup  # what the run reads the cache through
    monkeypatch.setattr(LMCache, "lookup", lambda self, rows, epoch: read.append(epoch) or lookup(self, rows, epoch))
    path, raw = write_recipe(tmp_path, tok, "cache", baseline=False)
    run_lm(load_recipe(path), tmp_path / "run")
    steps = len(read) // 2
    assert read == [0] * steps + [1] * steps
    read.clear()

    def stop(stage, step):
        if step == steps + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_lm(load_recipe(path), tmp_path / "cut", on_step=stop)
    read.clear()
    run_lm(load_recipe(path), tmp_path / "cut", resume=True)
    assert read and set(read) == {1}


def test_resume_reuses_finished_students(tok, tmp_path):
    path, _ = write_recipe(tmp_path, tok, "cache", baseline=False)
    first = run_lm(load_recipe(path), tmp_path / "run")
    before = (tmp_path / "run" / "student" / "model.safetensors").stat().st_mtime_ns
    again = run_lm(load_recipe(path), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "student" / "model.safetensors").stat().st_mtime_ns == before
    assert again["models"]["student"]["perplexity"] == pytest.approx(first["models"]["student"]["perplexity"])


def test_cache_refuses_other_divergences(tok, tmp_path):
    path, raw = write_recipe(tmp_path, tok, "cache")
    raw["distill"]["loss"] = "reverse_kl"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DistillError, match="forward_kl only"):
        run_lm(load_recipe(path), tmp_path / "run")


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_cache_then_mismatched_student_tokenizer(tok, tmp_path):
    path, raw = write_recipe(tmp_path, tok, "cache")
    done = cli("cache", str(path), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "bytes per token" in done.stdout
    # A student whose tokenizer has another vocabulary: one line naming both sizes.
    other = tiny_tokenizer(vocab_size=280)
    save_tiny(tiny_llama(other, layers=1, seed=5), other, tmp_path / "other")
    raw["student"] = {"path": str(tmp_path / "other")}
    path.write_text(yaml.safe_dump(raw))
    done = cli("run", str(path), "--out", str(tmp_path / "run2"), cwd=tmp_path)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith("error:") and str(len(tok)) in line and str(len(other)) in line


def test_metrics_json_is_complete(tok, tmp_path):
    path, _ = write_recipe(tmp_path, tok, "live", baseline=False)
    run_lm(load_recipe(path), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    student = metrics["models"]["student"]
    for key in ("parameters", "file_bytes", "perplexity", "agreement_with_teacher", "kl_to_teacher", "tokens_per_s"):
        assert student[key] is not None
    assert metrics["task"] == "causal_lm" and metrics["data"]["block_size"] == 16


def test_lm_stages_are_validated_and_an_untrained_teacher_is_called_out(tok, tmp_path, capsys):
    """Issue 18: training blocks held out as a validation split; both students are validated there (loss, top-1,
    agreement and KL with the teacher); a teacher the trained baseline beats (here: random weights) is said."""
    path, _ = write_recipe(tmp_path, tok, "live")
    metrics = run_lm(load_recipe(path), tmp_path / "run")
    assert metrics["data"]["validation_blocks"] >= 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    checks = [e for e in log if "validation" in e]
    assert {e["stage"] for e in checks} == {"baseline", "student"}
    assert set(checks[0]["validation"]) == {"loss", "accuracy", "agreement", "kl"}
    assert metrics["validation"]["student"]["last"]["step"] == max(e["step"] for e in checks if e["stage"] == "student")
    baseline_loss = metrics["validation"]["baseline"]["best"]["loss"]
    assert "warning: the teacher is not better than the student trained alone" in capsys.readouterr().out
    assert (
        metrics["warnings"][0].startswith("the teacher is not better")
        and f"{baseline_loss:.4f}" in metrics["warnings"][0]
    )


def test_report_shows_generations_of_every_model_side_by_side(tok, tmp_path):
    """Issue 19.5: the teacher, the cross-entropy student and the distilled student continue the same held-out
    prompts, greedy and sampled; greedy is what generate gives the model alone; the same seed samples alike."""
    from distill.evaluate import prompt_of

    path, raw = write_recipe(tmp_path, tok, "cache")
    raw["eval"] |= {"generations": 2, "generation_tokens": 5}
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    metrics = run_lm(recipe, tmp_path / "run")
    gens = metrics["generations"]
    assert len(gens) == 2 and all({"teacher", "baseline", "student"} <= set(entry) for entry in gens)
    heldout = setup(recipe).heldout
    prompt, rest = prompt_of(heldout, 0)
    assert gens[0]["prompt"] == tok.decode(prompt) and gens[0]["reference"] == tok.decode(rest[:5])
    student = load_student(tmp_path / "run").model
    ids = torch.from_numpy(prompt)[None]
    greedy = student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
    assert gens[0]["student"]["greedy"] == tok.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True)
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "## Generations on held-out prompts" in report and "| student, distilled |" in report
    assert "<h2>Generations on held-out prompts</h2>" in (tmp_path / "run" / "report.html").read_text()
    # Issue 20: the held-out passage shaded by the student's KL to the teacher, equal to a direct float64 sum.
    passage = metrics["token_kl"]
    teacher = setup(recipe).teacher
    ids = torch.from_numpy(heldout.input_ids[:1]).long()
    with torch.no_grad():
        p = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1, : len(tok)].double(), -1)
        q = torch.log_softmax(student(input_ids=ids).logits[0, :-1, : len(tok)].double(), -1)
    real = torch.from_numpy(heldout.labels[0, 1:]) != -100
    expected = (p.exp() * (p - q)).sum(-1)[real]
    assert passage["kl"] == pytest.approx(expected.tolist(), abs=2e-4)
    assert passage["pieces"] == [tok.decode([int(t)]) for t in ids[0, 1:][real]]
    assert (
        "Where the student differs from the teacher" in report
        and "class=passage" in (tmp_path / "run" / "report.html").read_text()
    )


def test_a_pruned_student_runs_end_to_end_and_records_what_went(tok, tmp_path):
    """Issue 19.2: student.prune in a recipe — the run measures importance on the training blocks, writes
    prune.json, and the student it trains has the planned shape; bad targets are one line before any work."""
    path, raw = write_recipe(tmp_path, tok, "cache", baseline=False)
    raw["student"] = {"prune": {"params": 0.5, "axes": ["depth", "width"], "calibration_blocks": 4},
                      "train": raw["student"]["train"]}  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    metrics = run_lm(load_recipe(path), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "prune.json").read_text())
    assert record["kept"]["blocks"] == 3 and len(record["blocks_removed"]) == 1 == len(
        metrics["pruning"]["blocks_removed"]
    )
    student = load_student(tmp_path / "run").model
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == record["kept"]["channels"]
    assert metrics["models"]["student"]["parameters"] < metrics["models"]["teacher"]["parameters"]
    raw["student"]["prune"]["params"] = 0.01
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DistillError, match="leaves no block"):
        run_lm(load_recipe(path), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_the_teacher_is_adapted_first_and_the_student_cut_from_the_adapted_teacher(tok, tmp_path):
    """Issue 19.1: teacher.train fine-tunes the teacher on the training blocks (stage 'teacher', resumable), the
    report shows it before and after, the student is cut from the adapted weights, the cache is keyed by them."""
    path, raw = write_recipe(tmp_path, tok, "cache", baseline=False)
    raw["teacher"]["train"] = {"epochs": 2, "batch_size": 8, "optimizer": "adamw", "lr": 3e-3}
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    metrics = run_lm(recipe, tmp_path / "run")
    models = metrics["models"]
    assert list(models)[:2] == ["teacher_base", "teacher"]
    assert models["teacher"]["perplexity"] < models["teacher_base"]["perplexity"]
    adapted = load_causal_lm(tmp_path / "run" / "teacher")[0]
    state = adapted.state_dict()
    cut = student_from_teacher(adapted, keep=2)
    setup_ = setup(recipe)
    init = with_student(replace(setup_, teacher=adapted), recipe).student_init
    assert all(torch.equal(init.state_dict()[k], cut.state_dict()[k]) for k in cut.state_dict())
    assert not all(torch.equal(state[k], setup_.teacher.state_dict()[k]) for k in state)
    caches = [p.name for p in (tmp_path / "run" / "cache").iterdir()]
    assert len(caches) == 1 and caches[0].startswith(f"teacher-{lm_id(tmp_path / 'run' / 'teacher', 'float32')}")
    assert "teacher before adaptation" in (tmp_path / "run" / "REPORT.md").read_text()
    # teacher.adapt: auto (the default) — the teacher as it came was validated first and lost: said in the report
    outcome = metrics["teacher_adaptation"]
    assert outcome["kept"] and outcome["best_step"] > 0 and outcome["best_perplexity"] < outcome["start_perplexity"]
    assert (
        outcome["said"].startswith("teacher.train helped")
        and outcome["said"] in (tmp_path / "run" / "REPORT.md").read_text()
    )
    # its fit: perplexity on as many training blocks as the validation split holds, and on that split
    fit, n = metrics["teacher_fit"], len(setup_.validation)
    size = {"vocab_size": len(tok), "batch_size": recipe.eval.batch_size}
    for name, blocks in (("training", setup_.train.subset(np.arange(n))), ("validation", setup_.validation)):
        loss = lm_validation(adapted, None, blocks, **size)["loss"]
        assert fit[f"{name}_perplexity"] == pytest.approx(np.exp(loss), rel=1e-5)
    assert fit["blocks"] == n and (memorised_teacher_warnings(fit) != []) == any(
        "has memorised its training blocks" in line for line in metrics["warnings"]
    )
    # resumed: the adapted teacher is loaded, not trained again
    before = (tmp_path / "run" / "teacher" / "model.safetensors").stat().st_mtime_ns
    run_lm(recipe, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "teacher" / "model.safetensors").stat().st_mtime_ns == before


def test_an_adaptation_that_does_not_help_gives_the_teacher_back_as_it_came(tok, tmp_path, capsys):
    """Issue 35.1: with teacher.adapt: auto the unadapted teacher competes on the validation split (step 0); an
    adaptation that never beats it (here: a learning rate that wrecks it) is dropped, said at run time, in the
    report and its warnings, and the run goes on with the teacher's own weights."""
    path, raw = write_recipe(tmp_path, tok, "cache", baseline=False, mixed_precision="no")
    raw["teacher"]["train"] = {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 5.0, "patience": 1}
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    metrics = run_lm(recipe, tmp_path / "run")
    outcome = metrics["teacher_adaptation"]
    assert not outcome["kept"] and outcome["best_step"] == 0
    assert outcome["said"] in capsys.readouterr().out and outcome["said"] in metrics["warnings"]
    given_back = load_causal_lm(tmp_path / "run" / "teacher")[0].state_dict()
    original = setup(recipe).teacher.state_dict()
    assert all(torch.equal(given_back[k], original[k]) for k in original)
    assert metrics["models"]["teacher"]["perplexity"] == pytest.approx(metrics["models"]["teacher_base"]["perplexity"])


def test_an_adapted_teacher_that_memorised_its_training_blocks_is_said(capsys):
    assert memorised_teacher_warnings({"training_perplexity": 20.0, "validation_perplexity": 29.9}) == []
    (line,) = memorised_teacher_warnings({"training_perplexity": 20.8, "validation_perplexity": 48.3})
    assert "perplexity 20.8 on them vs 48.3 on the validation split (2.32x)" in line and "teacher.train.lr" in line
    assert capsys.readouterr().out.strip() == f"warning: {line}"


def test_adapting_the_teacher_on_text_shorter_than_a_block_is_one_line(tok, tmp_path):
    path, raw = write_recipe(tmp_path, tok, "cache", baseline=False)
    raw["teacher"]["train"] = {"epochs": 1, "batch_size": 8, "optimizer": "adamw", "lr": 3e-3}
    (tmp_path / "short.txt").write_text("To be, or not to be.")
    raw["data"]["path"] = str(tmp_path / "short.txt")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DistillError, match=r"fewer than one block of data.block_size=16; lower data.block_size"):
        run_lm(load_recipe(path), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_validation_runs_the_frozen_teacher_once_and_scores_the_same(tok, monkeypatch):
    """The teacher's validation log-probs are kept between validations: the same scores as recomputing them, one
    teacher forward per batch in all; past the memory bound the rest is recomputed, still the same scores."""
    from distill import evaluate

    blocks = token_data(tok, blocks=5, seq=12)
    teacher, student = tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    size = {"vocab_size": teacher.config.vocab_size, "batch_size": 2}
    fresh = evaluate.lm_validation(student, teacher, blocks, **size)
    assert len(calls) == 3
    memo = {}
    first, again = (evaluate.lm_validation(student, teacher, blocks, **size, memo=memo) for _ in range(2))
    assert first == again == fresh and len(calls) == 6 and sorted(memo) == [0, 1, 2]
    monkeypatch.setattr(evaluate, "TEACHER_MEMO_BYTES", memo[0].nbytes)  # room for the first batch only
    small = {}
    assert [evaluate.lm_validation(student, teacher, blocks, **size, memo=small) for _ in range(2)] == [fresh] * 2
    assert len(calls) == 6 + 3 + 2 and list(small) == [0]


def test_a_student_trained_in_bf16_is_returned_without_autocast(tmp_path):
    """mixed_precision bf16 trains under autocast; the model the loop returns is evaluated, timed and exported in
    float32 beside the teacher (accelerate's wrapper kept its forward in bf16: a faster, other model in the report).
    In the suite's process, after its Accelerators of no mixed precision: make_accelerator lets one process change
    it (accelerate alone refuses); set back to no for the tests after this one."""
    tok = tiny_tokenizer()
    data = token_data(tok, blocks=4)
    spec = TrainSpec(epochs=1, batch_size=2, optimizer="adamw", lr=1e-3)
    assert make_accelerator("no").mixed_precision == "no"  # as after any earlier run in the process
    try:
        accelerator = make_accelerator("bf16")
        assert accelerator.mixed_precision == "bf16"
        trained = train_loop("bf16", tiny_llama(tok, layers=2, seed=3), spec, LMBatches(data, len(tok), 4), tmp_path,
                             accelerator, seed=0).cpu()  # fmt: skip
    finally:
        assert make_accelerator("no").mixed_precision == "no"
    fresh = tiny_llama(tok, layers=2, seed=3)
    fresh.load_state_dict(trained.state_dict())
    ids = torch.from_numpy(data.input_ids).long()
    with torch.no_grad():
        out, reference = trained(input_ids=ids).logits, fresh(input_ids=ids).logits
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = fresh(input_ids=ids).logits.float()
    assert not torch.equal(in_bf16, reference)  # autocast would show
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_mixed_precision_auto_and_a_cpu_without_native_bf16(monkeypatch, capsys):
    """Issue 37: `auto` is bf16 on a CPU with native bf16 matmul and float32 elsewhere (and on GPUs, as before);
    `bf16` asked on a CPU without it falls back to float32 with one warning line, once per process."""
    from distill import train

    for native in (True, False):
        monkeypatch.setattr(train, "native_bf16", lambda native=native: native)
        assert train.resolve_precision("auto", gpu=False)[0] == ("bf16" if native else "no")
        assert train.resolve_precision("auto", gpu=True)[0] == "no"
        assert train.resolve_precision("no", gpu=False) == ("no", "recipe")
        assert train.resolve_precision("bf16", gpu=True) == ("bf16", "recipe")
    train._warn_emulated_bf16.cache_clear()
    assert train.resolve_precision("bf16", gpu=False)[0] == "no"
    assert train.resolve_precision("bf16", gpu=False)[0] == "no"
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 1 and warned[0].startswith("warning: mixed_precision: bf16 asked") and "float32" in warned[0]
    accelerator = make_accelerator("bf16")
    assert accelerator.mixed_precision == "no" and accelerator.precision_note.startswith("float32 (bf16 asked")
    make_accelerator("no")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_loss_and_its_head_run_in_the_runs_precision(tmp_path, monkeypatch, precision):
    """The training loop runs the whole loss under the run's autocast, not only the model's forward: with bf16 the
    chunked loss's head matmuls are bf16 (issue 37: before, they stayed float32 and bf16 gained 1.10×)."""
    from distill.losses import sparse

    if precision == "bf16" and not native_bf16():
        pytest.skip("this CPU has no native bf16: the run trains in float32")
    seen = []
    original = sparse.matmul_dtype
    monkeypatch.setattr(sparse, "matmul_dtype", lambda t: seen.append(original(t)) or seen[-1])
    tok = tiny_tokenizer()
    spec = TrainSpec(epochs=1, batch_size=2, optimizer="adamw", lr=1e-3)
    try:
        batches = LMBatches(token_data(tok, blocks=4), len(tok), 4)
        train_loop(precision, tiny_llama(tok, layers=2, seed=3), spec, batches, tmp_path, make_accelerator(precision),
                   seed=0)  # fmt: skip
    finally:
        make_accelerator("no")
    assert seen and set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}


def test_quantization_aware_distillation_trains_on_the_gguf_grid(tok, tmp_path):
    """Issue 35.2: student.quantize trains the distilled student on through the GGUF type's rounding (stage
    'quantized', from the student's weights, against the float teacher); what it saves lies on the grid (rounding
    it again changes nothing), and the report puts it beside the same student rounded after training, same bytes."""
    from distill.models import gguf_grid

    path, raw = write_recipe(tmp_path, tok, "cache", baseline=False, mixed_precision="no")
    raw["student"]["quantize"] = {"type": "q4_0", "train": {"epochs": 1, "batch_size": 8, "optimizer": "adamw",
                                                           "lr": 1e-3}}  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    metrics = run_lm(load_recipe(path), tmp_path / "run")
    models = metrics["models"]
    assert {"student", "student_qad", "student_rtn"} <= set(models)
    assert models["student_qad"]["file_bytes"] == models["student_rtn"]["file_bytes"] < models["student"]["file_bytes"]
    summary = metrics["quantize"]
    assert summary["type"] == "q4_0" and summary["perplexity"]["qad"] == models["student_qad"]["perplexity"]
    saved = load_causal_lm(tmp_path / "run" / "quantized")[0]
    student = load_causal_lm(tmp_path / "run" / "student")[0].state_dict()
    state = saved.state_dict()
    types = gguf_grid.grid_types(saved, "q4_0")
    assert types and set(types.values()) == {"q4_0", "q8_0"}
    for name, qtype in types.items():
        assert torch.equal(gguf_grid.project(state[name], qtype), state[name]), name  # on the grid
    assert any(not torch.equal(state[n], gguf_grid.project(student[n], t)) for n, t in types.items())  # it trained
    assert [e["stage"] for e in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())].count(
        "quantized"
    )
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "trained through its GGUF rounding (QAD)" in report and "rounded to that GGUF type after training" in report
    # `distill export --format gguf-q4_0` writes exactly the trained grid: the file, dequantized, is the stage's weights
    from test_gguf_grid import _bits, _read_back

    from distill.tasks import export_run

    result = export_run(tmp_path / "run", "gguf-q4_0")
    tensors, types_in_file, n_bytes = _read_back(Path(result["path"]) / "model.gguf", saved)
    assert set(tensors) == set(state) and n_bytes == models["student_qad"]["file_bytes"]
    for name, tensor in state.items():
        assert np.array_equal(_bits(tensors[name]), _bits(tensor)), name
    assert types_in_file == {n: types[n].upper() if n in types else "F32" for n in state}
    assert result["top1_agreement"] == 1.0  # the reloaded file computes what the trained weights compute


@pytest.mark.parametrize("target", ["teacher", "student"])
def test_the_student_on_the_grid_learns_from_the_teacher_or_its_own_float_weights(tok, tmp_path, target):
    """Issue 35.2, ``quantize.target``: the KD term of the stage ``quantized`` is the forward KL from the teacher (the
    default) or from the distilled student's own float weights (frozen) to the student on the grid, over the whole
    vocabulary, per target token, with no hard labels — checked against a float64 reference."""
    from distill.models import gguf_grid
    from distill.tasks.causal_lm import distilled_student, quantized_batches
    from distill.tasks.skeleton import Run

    path, raw = write_recipe(tmp_path, tok, "cache", baseline=False, mixed_precision="no")
    raw["student"]["quantize"] = {"type": "q4_0", "train": {"max_steps": 1, "batch_size": 8, "optimizer": "adamw",
                                                           "lr": 1e-3}}  # fmt: skip
    if target == "student":
        raw["student"]["quantize"]["target"] = "student"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    assert recipe.student.quantize.target == target
    run_lm(recipe, tmp_path / "run")
    s = with_student(setup(recipe), recipe)
    run = Run(recipe, tmp_path / "run", True, None, make_accelerator("no"))
    distilled = distilled_student(s, run)
    batches = quantized_batches(s, run, distilled)
    assert isinstance(batches.signal, LiveLMSignal) and batches.distill.alpha == 0.0
    student = load_causal_lm(tmp_path / "run" / "student")[0]
    reference = s.teacher if target == "teacher" else student
    for name, tensor in batches.signal.model.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    assert not any(p.requires_grad for p in batches.signal.model.parameters())
    assert batches.signal.model is not distilled  # a student target copies the float weights it is given
    on_grid = gguf_grid.attach(distilled, "q4_0")  # as the stage's prepare makes it
    terms = batches.loss(on_grid, torch.tensor([0, 1]), torch.device("cpu"))
    assert set(terms) == {"loss", "kd"} and torch.equal(terms["loss"], terms["kd"])

    ids = torch.from_numpy(s.train.input_ids[[0, 1]]).long()
    mask = torch.from_numpy(s.train.labels[[0, 1]][:, 1:] != -100)
    vocab = s.vocab_size  # the tokenizer's: a head's rows past it are padding and get no probability
    with torch.no_grad():
        p = torch.log_softmax(copy.deepcopy(reference).double()(input_ids=ids).logits[:, :-1, :vocab], -1)
        q = torch.log_softmax(gguf_grid.rounded(student, "q4_0").double()(input_ids=ids).logits[:, :-1, :vocab], -1)
    kl = ((p.exp() * (p - q)).sum(-1)[mask]).mean()
    assert kl > 1e-5  # even rounding alone moves the tiny model's near-uniform outputs: the term is not 0
    # float32 log-probabilities of a 512-token vocabulary hold ~3e-7 absolute: the KL within that
    assert terms["kd"].item() == pytest.approx(kl.item(), abs=5e-7)


def test_a_cross_tokenizer_teacher_cannot_be_the_grid_students_target(tok, tmp_path):
    path, raw = write_recipe(tmp_path, tok, "cache")
    raw["student"]["quantize"] = {"type": "q4_0"}
    raw["distill"]["cross_tokenizer"] = "uld"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DistillError, match="set student.quantize.target: student") as err:
        load_recipe(path)
    assert "\n" not in str(err.value)
    raw["student"]["quantize"]["target"] = "student"
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(path).student.quantize.target == "student"
