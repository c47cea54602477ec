"""The causal-LM recipe (task: causal_lm), start to finish: teacher → data → student cut from it → (cache) →
student trained with plain next-token cross-entropy → distilled student → evaluation → report.

The losses never build [batch, seq, vocab] logits: the models run with ``logits_to_keep`` empty and the
loss goes from the last hidden states through the LM head chunk by chunk (``distill.losses.chunked``,
``distill.losses.sparse``). Every loss is a sum over distilled tokens divided by the tokens of its
micro-batch, and the loop weights micro-batches by their token counts, so the step's gradient is the mean
over every distilled token of the global batch, whatever the accumulation split.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from distill.data.lm import load_lm_data, split_lm_data, split_validation
from distill.data.token_blocks import SEPARATOR, TokenData
from distill.devices import to_numpy
from distill.errors import DistillError
from distill.evaluate import bits_per_char, lm_metrics, lm_validation, side_by_side, token_kl_passage
from distill.export.run_export import GGUF, LM_BLOCKS, Student, model_type
from distill.export.smooth import CALIBRATION_BLOCKS, SCORED_BLOCKS
from distill.io import STAGE_DONE, write_json
from distill.losses import IGNORE_INDEX
from distill.losses.mix import mix_weights, t2_scale
from distill.losses.sparse import chunked_cross_entropy
from distill.models import gguf_grid
from distill.models.causal_lm import (
    check_vocab,
    head_of,
    last_hidden,
    load_causal_lm,
    refuse_logit_softcapping,
    resolve_model_path,
    save_causal_lm,
)
from distill.models.cut import student_from_teacher
from distill.models.prune import plan, prune
from distill.recipe import LMDistillSpec, LMRecipe, load_recipe_as
from distill.report import Quality, ReportView, human_bytes
from distill.tasks.checks import memorised_teacher_warnings, teacher_warnings
from distill.tasks.skeleton import (
    OnStep,
    Run,
    StageSpec,
    data_source,
    machine,
    prepare_run_dir,
    quoted,
    run_stages,
    train_or_load_stage,
    validated_scores,
)
from distill.teachers.cross_tokenizer import (
    CrossTokenizerSignal,
    TeacherView,
    check_offsets,
    teacher_view,
)
from distill.teachers.identity import lm_id
from distill.teachers.lm_choice import cache_path, live_teacher, lm_signal, open_cache
from distill.teachers.lm_signals import LiveLMSignal, SparseSignal, StudentTokens
from distill.teachers.onpolicy import OnPolicyBatches
from distill.teachers.recorded import load_recorded
from distill.train import make_accelerator, validation_summary


@dataclass
class LMBatches:
    """Token blocks; hard next-token labels, plus the teacher's KD term (``signal``) when distilling."""

    data: TokenData
    vocab_size: int
    chunk_size: int
    distill: LMDistillSpec | None = None
    signal: LiveLMSignal | SparseSignal | CrossTokenizerSignal | None = None

    @property
    def weights(self) -> np.ndarray:
        return (self.data.labels[:, 1:] != IGNORE_INDEX).sum(axis=1)

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop as each epoch starts (resumed ones too): a sampled cache reads that epoch's
        draws."""
        if isinstance(self.signal, SparseSignal):
            self.signal.epoch = epoch

    def loss(self, model: nn.Module, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        index = to_numpy(rows)
        ids = torch.from_numpy(self.data.input_ids[index]).long().to(device)
        attention = torch.from_numpy(self.data.attention_mask[index]).long().to(device)
        next_tokens = torch.from_numpy(self.data.labels[index][:, 1:]).to(device)
        mask = next_tokens != IGNORE_INDEX
        hidden = last_hidden(model, ids, attention)[:, :-1]
        weight, bias = head_of(model)  # after the forward: under FSDP the root's parameters are gathered by it
        size = float(mask.sum())  # = self.weights[rows].sum(): the loop weighs this micro-batch by it
        tokens = StudentTokens(hidden, weight, bias, rows, ids, attention, mask, self.chunk_size, self.vocab_size, size)
        d = self.distill
        if d is None:
            ce = chunked_cross_entropy(hidden, weight, next_tokens, **tokens.loss_kwargs())
            return {"loss": ce, "ce": ce.detach()}
        kd_weight, ce_weight = mix_weights(d.alpha, t2_scale(d.temperature, d.t2_scaling))
        if d.alpha == 0:
            kd = self.signal.kd(tokens)
            return {"loss": kd_weight * kd, "kd": kd.detach()}
        loss, kd, ce = self.signal.kd_with_ce(tokens, next_tokens, kd_weight, ce_weight)  # one pass where it can
        return {"loss": loss, "kd": kd, "ce": ce}


@dataclass
class LMSetup:
    teacher: nn.Module
    tokenizer: object
    teacher_id: str
    student_init: nn.Module | None  # None until with_student makes a student cut or pruned from the teacher
    vocab_size: int
    train: TokenData
    heldout: TokenData  # the test split of the report
    validation: TokenData | None  # training blocks held out to validate every stage and check the teacher
    pruning: dict | None = None  # what models.prune removed and why (student.prune)
    teacher_base: nn.Module | None = None  # the teacher before teacher.train adapted it
    teacher_view: TeacherView | None = None  # distill.cross_tokenizer: the teacher's tokens of each training block
    teacher_tokenizer: object = None  # distill.cross_tokenizer: the teacher's own (``tokenizer`` is the student's)
    check: object = None  # the students' validation (``validator``, with the teacher: its memo shared by both)
    teacher_scores: dict | None = None  # the teacher's validation scores, for the checks that read them
    fit: dict | None = None  # ``teacher_fit``: the adapted teacher's perplexity on its training blocks and off them
    adaptation: dict | None = None  # ``adaptation_outcome``: did teacher.train beat the teacher as it came


def setup(recipe: LMRecipe) -> LMSetup:
    """Load teacher, data and a student given by path; fail fast on a vocabulary mismatch. A student cut or pruned
    from the teacher is made by ``with_student``, after ``adapt_teacher`` (it comes from the adapted teacher)."""
    teacher_path = resolve_model_path(recipe.teacher.path)
    teacher, tokenizer = load_causal_lm(teacher_path, dtype=recipe.teacher.dtype)
    teacher.eval().requires_grad_(False)
    student_spec = recipe.student
    if student_spec.path is not None:  # checked before the data is read: a mismatch fails fast
        student, student_tokenizer = load_causal_lm(resolve_model_path(student_spec.path), dtype="float32")
    else:  # cut or pruned from the teacher: its tokenizer and configuration
        student, student_tokenizer = teacher, tokenizer
        if student_spec.prune is not None:
            plan(teacher.config, student_spec.prune.params, student_spec.prune.axes)  # a bad target fails fast
    cross = recipe.distill.cross_tokenizer
    vocab_size = check_vocab(tokenizer, student_tokenizer, teacher.config, student.config, cross_tokenizer=cross)
    if cross == "align" and tokenizer.get_vocab() == student_tokenizer.get_vocab():
        cross = None  # one tokenizer: align is forward KL, token by token on the same blocks
    if cross:  # the blocks are the student's tokens; the teacher reads their text with its own tokenizer
        check_offsets(tokenizer, student_tokenizer)
    data_tokenizer = student_tokenizer if cross else tokenizer
    if recipe.distill.signal == "live":  # the cache stores the teacher's own logits; recorded traces its log-probs
        hint = ": use distill.signal: cache (it stores the teacher's own logits) or a teacher without the cap"
        refuse_logit_softcapping(teacher, "teacher", hint)
    refuse_logit_softcapping(student, "student", ": choose a student without final_logit_softcapping")
    if recipe.distill.signal == "recorded":  # the traces carry the teacher's targets
        train, heldout = split_lm_data(load_recorded(recipe.data, tokenizer), recipe.data, recipe.seed)
    else:
        train, heldout = load_lm_data(recipe.data, data_tokenizer, recipe.seed, with_texts=bool(cross))
    train, validation = split_validation(train, recipe.data.validation_fraction, recipe.seed)
    if recipe.teacher.train is not None and not len(train):
        raise DistillError(
            f"teacher.train: {recipe.data.path} has no training block of {recipe.data.block_size} tokens to adapt the "
            "teacher on; give more text or a smaller data.block_size"
        )
    teacher_id = lm_id(teacher_path, recipe.teacher.dtype)
    student_init = student if student_spec.path is not None else None  # else: with_student, from the adapted teacher
    view = None
    if cross:
        view = teacher_view(train, tokenizer, student_tokenizer, teacher_vocab=len(tokenizer), student_vocab=vocab_size)
    return LMSetup(
        teacher, data_tokenizer, teacher_id, student_init, vocab_size, train, heldout, validation, teacher_view=view,
        teacher_tokenizer=tokenizer if cross else None,
    )  # fmt: skip


def with_student(s: LMSetup, recipe: LMRecipe) -> LMSetup:
    """``s`` with the student cut (``from_teacher``) or pruned (``prune``) from its teacher, as adapted."""
    spec = recipe.student
    if spec.from_teacher is not None:
        return replace(s, student_init=student_from_teacher(s.teacher, **spec.from_teacher.model_dump()).float())
    if spec.prune is not None:  # importance measured on the first training blocks
        blocks = slice(0, spec.prune.calibration_blocks)
        ids = torch.from_numpy(s.train.input_ids[blocks]).long()
        attention = torch.from_numpy(s.train.attention_mask[blocks]).long()
        student, pruning = prune(s.teacher, (ids, attention), spec.prune.params, spec.prune.axes)
        return replace(s, student_init=student.float(), pruning=pruning)
    return s


def adapt_teacher(s: LMSetup, recipe: LMRecipe, out: Path, accelerator, *, resume: bool, on_step: OnStep) -> LMSetup:
    """``teacher.train``: the teacher fine-tuned with next-token cross-entropy on the training blocks first (stage
    ``teacher``: checkpointed, resumable, validated like the students), so it knows the domain it teaches. Its
    weights get their own id, so a cache of its outputs is keyed by the adapted teacher."""
    stage = next((stage for stage in stages(recipe) if stage.name == "teacher"), None)
    if stage is None:
        return s
    run = Run(recipe, out, resume, on_step, accelerator)
    adapted(s, run, train_or_load_stage(sys.modules[__name__], s, run, stage, None, recipe.teacher.train))
    s.adaptation = adaptation_outcome(out)
    if s.adaptation is not None and run.main:  # `distill cache` says it too
        print(s.adaptation["said"], flush=True)
    return s


def adapted(s: LMSetup, run: Run, trained: nn.Module) -> None:
    """``s`` with the adapted teacher (where setup leaves a teacher: on the CPU, in its dtype, frozen); the one it
    started from is kept for the report."""
    trained = trained.to("cpu", s.teacher.dtype).eval().requires_grad_(False)
    s.teacher, s.teacher_base, s.teacher_id = trained, s.teacher, lm_id(run.out / "teacher", run.recipe.teacher.dtype)


def student_batches(recipe: LMRecipe, out: Path, s: LMSetup, accelerator: Accelerator):
    """What the distilled student trains on: the recipe's teacher signal (``teachers.lm_choice``) over the training
    blocks, or on-policy generations scored by the teacher."""
    d = recipe.distill
    if d.onpolicy is not None:
        return OnPolicyBatches(
            s.train,
            live_teacher(recipe, s, accelerator),
            s.vocab_size,
            lam=d.onpolicy.lam,
            beta=d.onpolicy.beta,
            max_new_tokens=d.onpolicy.max_new_tokens,
            temperature=d.onpolicy.temperature,
            pad_id=pad_id(s.tokenizer),
            eos_id=s.tokenizer.eos_token_id,
            chunk_size=d.chunk_size,
            seed=recipe.seed,
        )
    return LMBatches(s.train, s.vocab_size, d.chunk_size, distill=d, signal=lm_signal(recipe, out, s, accelerator))


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def validator(s: LMSetup, recipe: LMRecipe, teacher: nn.Module | None):
    """A model → its next-token loss and accuracy on the validation blocks (and agreement and KL with
    ``teacher``); None without a validation split."""
    if s.validation is None:
        return None
    if s.teacher_view is not None:  # another tokenizer: agreement and KL token by token mean nothing
        teacher = None
    size = {"vocab_size": s.vocab_size, "batch_size": recipe.eval.batch_size}
    memo = {}  # the frozen teacher's log-probs, computed at the first validation and read at every later one
    return lambda model: lm_validation(model, teacher, s.validation, **size, memo=memo)


def teacher_fit(s: LMSetup, recipe: LMRecipe, validation: dict) -> dict | None:
    """With ``teacher.train``: the adapted teacher's perplexity on the first training blocks (as many as the
    validation split holds) and on the validation split (``validation``: its scores there, as ``validator`` gives
    them); None without an adaptation."""
    if s.teacher_base is None:
        return None
    seen = s.train.subset(np.arange(min(len(s.train), len(s.validation))))
    training = lm_validation(s.teacher, None, seen, vocab_size=s.vocab_size, batch_size=recipe.eval.batch_size)
    return {
        "training_perplexity": math.exp(training["loss"]),
        "validation_perplexity": math.exp(validation["loss"]),
        "blocks": len(seen),
    }


TASK = "causal_lm"
VALIDATED = ("baseline", "student")  # the stages whose validation the report lists
QUALITY = {"quality": "perplexity", "noun": "held-out perplexity"}  # how the student check reads the results


def stages(recipe: LMRecipe) -> list[StageSpec]:
    """Teacher (adapted with ``teacher.train``) → baseline (next-token cross-entropy) → the teacher check →
    student (the teacher's signal), each trained from its own seed."""
    adapt = recipe.teacher.train is not None
    teacher = [StageSpec("teacher", "labels", train_seed=7, validate_start=recipe.teacher.adapt == "auto")] * adapt
    baseline = [StageSpec("baseline", "labels", checks=("teacher",))] if recipe.baseline else []
    quantized = [QUANTIZED] if recipe.student.quantize is not None else []
    return [*teacher, *baseline, StageSpec("student", "teacher", checks=("student",)), *quantized]


# Quantization-aware distillation: the distilled student trained on through its GGUF type's rounding.
QUANTIZED = StageSpec("quantized", "teacher", train_seed=11, train_spec=lambda recipe: recipe.student.quantize_train())


def teacher(s: LMSetup, run: Run, trained: nn.Module | None) -> list[str]:
    """The teacher as adapted (``trained``), the student cut or pruned from it, the validation, and the teacher's
    validation scores, once, for the checks that read them (with another tokenizer the teacher cannot be scored on
    the student's tokens: no teacher check). Said now, before any student trains: a memorised teacher."""
    recipe = run.recipe
    said = []
    if trained is not None:
        adapted(s, run, trained)
        s.adaptation = adaptation_outcome(run.out)
        if s.adaptation is not None:  # said now; in the report's note (and its warnings when it did not help)
            said += [] if s.adaptation["kept"] else [s.adaptation["said"]]
            if run.main:
                print(s.adaptation["said"], flush=True)
    cut = with_student(s, recipe)
    s.student_init, s.pruning = cut.student_init, cut.pruning
    s.check = validator(s, recipe, s.teacher)
    if s.check is not None and s.teacher_view is None and run.main:
        if recipe.baseline or s.teacher_base is not None:
            s.teacher_scores = validator(s, recipe, None)(s.teacher)
    s.fit = teacher_fit(s, recipe, s.teacher_scores) if s.teacher_scores else None
    kept = s.adaptation is None or s.adaptation["kept"]  # a teacher given back as it came memorised nothing
    return said + (memorised_teacher_warnings(s.fit) if s.fit and kept else [])


def quantization_summary(results: dict, qtype: str, target: str) -> dict:
    """QAD against rounding after training, same student and file: the perplexity each adds to the float student's,
    and the share of rounding's gap that training through the grid closed (None when rounding opened none)."""
    float_ppl, qad, rtn = (results[name]["perplexity"] for name in ("student", "student_qad", "student_rtn"))
    gap = rtn - float_ppl
    return {
        "type": qtype,
        "target": target,
        "file_bytes": results["student_qad"]["file_bytes"],
        "perplexity": {"float": float_ppl, "qad": qad, "rtn": rtn},
        "gap_closed": (rtn - qad) / gap if gap > 0 else None,
    }


def adaptation_outcome(out: Path) -> dict | None:
    """With ``teacher.adapt: auto`` the teacher as it came was validated at step 0 and competed with the adapted one
    (``train.train_loop``'s ``validate_start``): which won, on what validation loss, in one line for the run and the
    report. None without that first validation."""
    summary = validation_summary(out, "teacher")
    if not summary or summary["first"]["step"] != 0:
        return None
    start, best = summary["first"], summary["best"]
    kept = best["step"] != 0
    before, after = math.exp(start["loss"]), math.exp(best["loss"])
    said = (
        f"teacher.train helped: validation perplexity {before:.4g} as it came, {after:.4g} adapted (step "
        f"{best['step']}); the run uses the adapted teacher"
        if kept
        else f"teacher.train did not help: no adapted weights beat the teacher as it came on the validation split "
        f"(perplexity {before:.4g}); the run uses the teacher as it came"
    )
    return {"kept": kept, "start_perplexity": before, "best_perplexity": after, "best_step": best["step"], "said": said}


def prepare(s: LMSetup, run: Run, name: str, settings: LMDistillSpec | None, spec):
    """The teacher: a float32 copy to fine-tune on next-token labels; a student: a copy of its starting weights,
    on next-token labels (baseline) or the recipe's teacher signal (``student_batches``)."""
    recipe = run.recipe
    if name == "teacher":
        model = copy.deepcopy(s.teacher).float().requires_grad_(True)
        return model, spec, LMBatches(s.train, s.vocab_size, recipe.distill.chunk_size), validator(s, recipe, None)
    if name == "quantized":  # the distilled student, its weights read through their GGUF grid
        start = distilled_student(s, run)
        batches = quantized_batches(s, run, start)  # before attach: a `student` target copies the float weights
        return gguf_grid.attach(start, recipe.student.quantize.type), spec, batches, s.check
    if settings is None:
        batches = LMBatches(s.train, s.vocab_size, recipe.distill.chunk_size)
    else:
        batches = student_batches(recipe, run.out, s, run.accelerator)
    return copy.deepcopy(s.student_init), spec, batches, s.check


def distilled_student(s: LMSetup, run: Run) -> nn.Module:
    """The distilled student as its stage saved it (`distill plan` has none yet: its shapes, as it starts)."""
    trained = run.out / "student"
    return load(s, run, "student", trained) if (trained / STAGE_DONE).exists() else copy.deepcopy(s.student_init)


def quantized_batches(s: LMSetup, run: Run, distilled: nn.Module) -> LMBatches:
    """What the student on the grid learns from (``quantize.target``), live, by forward KL over the whole vocabulary
    at temperature 1, without hard labels: the teacher (default), or the student's own float weights as distilled,
    frozen (what rounding took, given back). Dense and live rather than the student stage's signal: on the validation
    split of bench/lm_frontier.py's ¾ student (q4_0, 120 steps at lr 1e-4; BENCHMARKS.md, stop 42) the teacher so
    gave perplexity 39.41 and its own weights 40.97, against 41.89 from the teacher's sampled top-16 cache at α 0.5
    (the float student: 40.29). ``distilled``: the float student, copied for a ``student`` target, not changed."""
    recipe = run.recipe
    if recipe.student.quantize.target == "teacher":
        reference = live_teacher(recipe, s, run.accelerator)
    else:
        reference = copy.deepcopy(distilled).eval().requires_grad_(False).to(run.accelerator.device)
    distill = recipe.distill.model_copy(update={"loss": "forward_kl", "temperature": 1.0, "alpha": 0.0})
    return LMBatches(s.train, s.vocab_size, distill.chunk_size, distill=distill, signal=LiveLMSignal(reference))


def load(s: LMSetup, run: Run, name: str, folder: Path) -> nn.Module:
    dtype = {"dtype": run.recipe.teacher.dtype} if name == "teacher" else {}
    return load_causal_lm(folder, **dtype)[0]


def save(s: LMSetup, run: Run, name: str, model: nn.Module, folder: Path) -> None:
    if name == "quantized":  # the weights it trained through, on the grid: what a GGUF of its type holds exactly
        gguf_grid.detach(model)
    save_causal_lm(model, s.tokenizer, folder)


def check_teacher(s: LMSetup, run: Run, baseline: nn.Module) -> tuple[list[str], None]:
    if s.teacher_scores is None:
        return [], None
    return teacher_warnings(s.teacher_scores, validated_scores(run.out, "baseline", s.check, baseline)), None


def evaluate(s: LMSetup, run: Run, trained: dict, distill: LMDistillSpec, int8) -> tuple[dict, dict]:
    recipe, out = run.recipe, run.out
    models: dict[str, nn.Module] = {"teacher": s.teacher, "student_init": s.student_init}
    if s.teacher_base is not None:  # the report shows the teacher before and after its adaptation
        models = {"teacher_base": s.teacher_base, **models}
    models |= {name: trained[name] for name in ("baseline", "student") if name in trained}
    files = {name: out / name / "model.safetensors" for name in ("baseline", "student")}
    if int8:
        models["student_int8"], files["student_int8"] = int8
    quantize = recipe.student.quantize
    if quantize is not None:  # trained through the rounding, beside the same student rounded after training
        models["student_qad"] = trained["quantized"]
        models["student_rtn"] = gguf_grid.rounded(trained["student"], quantize.type)
    results = lm_metrics(
        models, s.heldout, vocab_size=s.vocab_size, batch_size=recipe.eval.batch_size, threads=recipe.eval.threads
    )
    for name, file in files.items():
        if name in results:
            results[name]["file_bytes"] = file.stat().st_size
    if quantize is not None:  # the GGUF's tensor bytes; tokens/s is the float forward of the same weights
        for name in ("student_qad", "student_rtn"):
            results[name]["file_bytes"] = gguf_grid.file_bytes(models[name], quantize.type)
    if s.teacher_view is not None:
        cross_tokenizer_scores(results, models, s)
    if "student_int8" in results:  # dynamic int8 modules hide their packed weights from .parameters()
        results["student_int8"]["parameters"] = results["student"]["parameters"]
    data = {"train_blocks": len(s.train), "heldout_blocks": len(s.heldout), "block_size": recipe.data.block_size}
    data["validation_blocks"] = 0 if s.validation is None else len(s.validation)
    extra = {"machine": machine(cpu_threads=recipe.eval.threads), "distill": distill.model_dump(mode="json")}
    extra["data"] = data
    if s.fit:
        extra["teacher_fit"] = s.fit
    if s.adaptation is not None:
        extra["teacher_adaptation"] = s.adaptation
    if quantize is not None:
        extra["quantize"] = quantization_summary(results, quantize.type, quantize.target)
    if s.pruning is not None:  # the whole record in the run folder, the gist in metrics.json
        write_json(out / "prune.json", s.pruning)
        extra["pruning"] = {key: s.pruning[key] for key in ("share", "axes", "kept", "teacher", "blocks_removed")}
    if recipe.eval.generations:  # the teacher of another tokenizer cannot be decoded with the student's
        shown = {name: models[name] for name in ("teacher", "baseline", "student") if name in models}
        shown = {name: m for name, m in shown.items() if s.teacher_view is None or name != "teacher"}
        extra["generations"] = side_by_side(
            shown,
            s.heldout,
            s.tokenizer,
            prompts=recipe.eval.generations,
            new_tokens=recipe.eval.generation_tokens,
            seed=recipe.seed,
        )
    if s.teacher_view is None:  # per-token KL needs one vocabulary
        extra["token_kl"] = token_kl_passage(
            models["student"], models["teacher"], s.heldout, s.tokenizer, vocab_size=s.vocab_size
        )
    return results, extra


def starter(teacher: Path, data: Path) -> str:
    """The starting recipe ``distill init`` writes (``tasks/starter.py``)."""
    return f"""# A causal LM distilled into a student pruned from it (written by distill init).
task: causal_lm
name: {quoted(data.stem)}
data:
  source: {data_source(data, "causal_lm")}  # text: packed blocks; jsonl: prompt/response pairs
  path: {quoted(data)}
  block_size: 256
teacher:
  path: {quoted(teacher)}  # an HF folder or a .gguf file
  # adapted to your text first; kept only where it beats the teacher as it came on the validation split
  train: {{epochs: 1, batch_size: 8, optimizer: adamw, lr: 1.0e-4}}
student:
  # half the teacher's block weights: the blocks that change their input least on your text go (bench/lm_students.py:
  # the best start measured, ahead of width pruning and far ahead of evenly spaced layers)
  prune: {{params: 0.5, axes: [depth]}}
  train: {{epochs: 1, batch_size: 8, optimizer: adamw, lr: 5.0e-4}}
distill:
  signal: cache  # the teacher runs once over the data (distill cache); live: it runs beside the student
  temperature: 1
"""


def run(recipe: LMRecipe, out: Path, *, resume: bool = False, force: bool = False, on_step: OnStep = None) -> dict:
    return run_stages(sys.modules[__name__], recipe, out, resume=resume, force=force, on_step=on_step)


def cross_tokenizer_scores(results: dict, models: dict, s: LMSetup) -> None:
    """Across tokenizers, perplexities per token and agreement or KL token by token compare nothing: every model is
    scored in bits per character of the held-out text, each through its own tokenizer; the teacher's perplexity
    (measured on the student's tokens) and the token-level comparisons are dropped."""
    chunks = [doc for text in s.heldout.texts.texts for doc in text.split(SEPARATOR) if doc]
    for name, model in models.items():
        tokenizer = s.teacher_tokenizer if name in ("teacher", "teacher_base") else s.tokenizer
        results[name]["bits_per_char"] = bits_per_char(model, tokenizer, chunks)
        results[name] |= {"agreement_with_teacher": None, "kl_to_teacher": None}
        if name in ("teacher", "teacher_base"):
            results[name]["perplexity"] = None


def build_cache(recipe: LMRecipe, out: Path) -> Path:
    """``distill cache``: run the teacher once over the training data and store its sparse targets (adapting it first
    under ``teacher.train``, in the recipe's mixed precision). The run folder records the recipe, as ``distill run``
    does: a later ``distill run --resume`` with another recipe is refused instead of reusing this teacher."""
    prepare_run_dir(recipe, Path(out), resume=True, force=False, command="distill cache")
    accelerator = make_accelerator(recipe.mixed_precision)
    s = adapt_teacher(setup(recipe), recipe, Path(out), accelerator, resume=True, on_step=None)
    path = cache_path(recipe, Path(out), s)
    cache = open_cache(recipe, Path(out), s, accelerator.device)
    print(f"{path}: {len(s.train)} blocks, {cache.bytes_per_token:.0f} bytes per token")
    return path


def load_student(run_dir: Path, fmt: str = "safetensors") -> Student:
    """The finished student, held-out blocks to check its export on, and training blocks to calibrate int8. A GGUF of
    the type the run trained through (``student.quantize``) is written from that stage's weights: they lie on its
    grid, so the file holds exactly what was trained; any other format from the distilled student."""
    recipe = load_recipe_as(LMRecipe, run_dir / "recipe.yaml")
    quantize, quantized = recipe.student.quantize, run_dir / "quantized"
    trained_for = quantize is not None and fmt == f"gguf-{quantize.type}" and (quantized / STAGE_DONE).exists()
    folder = quantized if trained_for else run_dir / "student"
    model, tokenizer = load_causal_lm(folder)
    train, heldout = load_lm_data(recipe.data, tokenizer, recipe.seed)
    blocks = heldout.subset(np.arange(min(len(heldout), LM_BLOCKS)))
    ids, mask = blocks.input_ids.astype(np.int64), blocks.attention_mask.astype(bool)
    calibration = train.input_ids[: CALIBRATION_BLOCKS + SCORED_BLOCKS].astype(np.int64)
    return Student(
        "causal_lm",
        model,
        folder,
        ids,
        mask,
        tokenizer=tokenizer,
        calibration=calibration,
        reload=lambda export: load_causal_lm(export)[0],
    )


def export_formats(student_folder: Path) -> list[str]:
    """GGUF needs a Llama-family student: the GGUF writer knows only llama."""
    every = ["safetensors", "int8", "onnx", "onnx-int8", *GGUF]
    return every if model_type(student_folder) == "llama" else every[:4]


COLUMNS = [
    ("parameters", "params", "{:,}"),
    ("file_bytes", "weights", None),
    ("perplexity", "held-out perplexity", "{:.2f}"),
    ("agreement_with_teacher", "top-1 agrees w/ teacher", "{:.2%}"),
    ("kl_to_teacher", "held-out KL to teacher", "{:.4f}"),
    ("tokens_per_s", "tokens/s (CPU forward)", "{:,.0f}"),
]


BITS_PER_CHAR = ("bits_per_char", "held-out bits/char (each its own tokenizer)", "{:.4f}")


def cross_tokenizer_headline(models: dict) -> str:
    """Across tokenizers the one fair unit is bits per character of the same held-out text."""
    t, s = models["teacher"], models["student"]
    text = (
        f"The distilled student (another tokenizer) is {t['parameters'] / s['parameters']:.1f}× smaller "
        f"({human_bytes(s['file_bytes'])} vs {human_bytes(t['file_bytes'])}), with {s['bits_per_char']:.4f} bits per "
        f"character of held-out text against the teacher's {t['bits_per_char']:.4f}"
    )
    if "baseline" in models:
        b = models["baseline"]["bits_per_char"]
        change = 100 * (b - s["bits_per_char"]) / b
        effect = f"{'saves' if change >= 0 else 'costs'} {abs(change):.1f}% of the bits"
        text += f"; trained with plain cross-entropy it reaches {b:.4f}: distillation {effect}"
    return text + "."


def headline(models: dict) -> str:
    """Size, speed and quality of the distilled LM against the teacher and the cross-entropy student."""
    if "bits_per_char" in models["student"]:
        return cross_tokenizer_headline(models)
    t, s = models["teacher"], models["student"]
    text = (
        f"The distilled student is {t['parameters'] / s['parameters']:.1f}× smaller "
        f"({human_bytes(s['file_bytes'])} vs {human_bytes(t['file_bytes'])}), "
        f"{s['tokens_per_s'] / t['tokens_per_s']:.1f}× faster (tokens/s), with held-out perplexity "
        f"{s['perplexity']:.2f} against the teacher's {t['perplexity']:.2f} and agrees with the teacher's top "
        f"token {s['agreement_with_teacher']:.1%} of the time"
    )
    if "baseline" in models:
        b = models["baseline"]
        gap = b["perplexity"] - t["perplexity"]
        effect = (
            f"distillation closes {100 * (b['perplexity'] - s['perplexity']) / gap:.0f}% of its perplexity gap to "
            "the teacher"
            if gap > 0
            else "the teacher is no better, so there is no gap for distillation to close"
        )
        text += (
            f"; the same student trained with plain cross-entropy reaches {b['perplexity']:.2f} "
            f"(agreement {b['agreement_with_teacher']:.1%}): {effect}"
        )
    text += "."
    if "student_int8" in models:
        q = models["student_int8"]
        text += (
            f" Quantized to int8 it is a {human_bytes(q['file_bytes'])} file ({t['file_bytes'] / q['file_bytes']:.1f}× "
            f"smaller than the teacher), {q['tokens_per_s'] / t['tokens_per_s']:.1f}× faster, with perplexity "
            f"{q['perplexity']:.2f}."
        )
    if "teacher_base" in models:
        text += (
            f" Adapted to this data first, the teacher went from perplexity {models['teacher_base']['perplexity']:.2f} "
            f"to {t['perplexity']:.2f}."
        )
    return text


def note(metrics: dict) -> str:
    data, machine = metrics.get("data", {}), metrics.get("machine", {})
    models = metrics["models"]
    return (
        f"Held-out: {data.get('heldout_blocks', '?')} blocks of {data.get('block_size', '?')} tokens "
        f"({next(iter(models.values())).get('heldout_tokens', '?')} predicted tokens); training: "
        f"{data.get('train_blocks', '?')} blocks. Weights: float32 bytes of the unique parameters "
        f"(the saved files for trained students). Tokens/s: median forward pass, "
        f"{machine.get('cpu_threads', '?')} CPU thread(s), torch {machine.get('torch', '?')}."
        + (f" Teacher: {metrics['teacher_adaptation']['said']}." if "teacher_adaptation" in metrics else "")
    )


VIEW = ReportView(
    headline=headline,
    columns=lambda models: [*COLUMNS, BITS_PER_CHAR] if "bits_per_char" in models["student"] else COLUMNS,
    note=note,
    quality=lambda models: (
        Quality("bits_per_char", "held-out bits per character (lower is better)")
        if "bits_per_char" in models["student"]
        else Quality("perplexity", "held-out perplexity (lower is better)", log_scale=True)
    ),
)
