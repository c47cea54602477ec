"""Which teacher signal a causal-LM recipe trains its student on, and the teacher cache behind it: live (the whole
teacher, or sharded over the processes), a cache on disk (sparse top-k / sampled targets, or cross-tokenizer
targets; from the local teacher or from a served one's answers), or the log-probabilities recorded with the traces.

The task hands over what it has set up (``TeacherSource``: its teacher, tokenizers and training blocks); nothing here
knows the task."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import nn

from distill import parallel
from distill.data.token_blocks import TokenData
from distill.recipe import LMRecipe
from distill.teachers.cross_tokenizer import (
    CrossTokenizerCache,
    CrossTokenizerSignal,
    TeacherView,
    build_cross_cache,
    cross_cache_dir,
)
from distill.teachers.identity import served_id
from distill.teachers.lm_cache import LMCache, ensure_lm_cache, lm_cache_dir
from distill.teachers.lm_signals import LiveLMSignal, SparseSignal
from distill.teachers.served_cache import served_teacher_logits
from distill.teachers.store import cache_root


class TeacherSource(Protocol):
    """What a causal-LM run has set up that the teacher signal is made from."""

    teacher: nn.Module  # frozen, on the CPU
    teacher_id: str  # the local teacher's weights
    tokenizer: object  # the student's: a served teacher's answers are decoded with it
    vocab_size: int
    train: TokenData  # the training blocks
    teacher_view: TeacherView | None  # distill.cross_tokenizer: the teacher's tokens of each training block


def cache_sets(recipe: LMRecipe, blocks: int) -> int:
    """Sets of draws the sampled cache holds: ``distill.cache_sets``, else one per epoch the student trains (a top-k
    cache is not drawn: one)."""
    d, train = recipe.distill, recipe.student.train
    if d.cache_mode == "topk":
        return 1
    steps_per_epoch = math.ceil(blocks / train.batch_size)
    return d.cache_sets or min(64, math.ceil(train.max_steps / steps_per_epoch) if train.max_steps else train.epochs)


def cache_teacher_id(recipe: LMRecipe, s: TeacherSource) -> str:
    """What keys the teacher cache: the local teacher's weights, or the server and model that answered."""
    endpoint = recipe.teacher.endpoint
    return served_id(endpoint.url, endpoint.model, endpoint.format) if endpoint else s.teacher_id


def cache_path(recipe: LMRecipe, out: Path, s: TeacherSource, data_id: str | None = None) -> Path:
    """The teacher cache folder of this recipe, teacher and training blocks (under ``store.cache_root``); ``data_id``:
    the blocks' fingerprint where the caller has it (it hashes every training token)."""
    d, data_id = recipe.distill, data_id or s.train.fingerprint()
    if s.teacher_view is not None:
        return cross_cache_dir(cache_root(d, out), s.teacher_id, data_id, s.teacher_view, d.cache_k, d.temperature)
    sets = cache_sets(recipe, len(s.train.input_ids))
    return lm_cache_dir(cache_root(d, out), cache_teacher_id(recipe, s), data_id, d, sets)


def open_cache(recipe: LMRecipe, out: Path, s: TeacherSource, device) -> LMCache | CrossTokenizerCache:
    """The teacher cache of this recipe, built (or finished) first if needed."""
    d, data_id = recipe.distill, s.train.fingerprint()
    path = cache_path(recipe, out, s, data_id)
    if s.teacher_view is not None:
        options = {"k": d.cache_k, "temperature": d.temperature, "teacher_id": s.teacher_id, "data_id": data_id}
        return build_cross_cache(path, s.teacher, s.train, s.teacher_view, **options, device=device)
    endpoint, blocks = recipe.teacher.endpoint, s.train.input_ids  # a served teacher: the cache from its answers
    served = endpoint and served_teacher_logits(endpoint, s.vocab_size, d.cache_k, s.tokenizer.decode, blocks)
    return ensure_lm_cache(
        path,
        s.teacher,
        s.train.input_ids,
        recipe.distill,
        teacher_id=cache_teacher_id(recipe, s),
        data_id=data_id,
        vocab_size=s.vocab_size,
        seed=recipe.seed,
        device=device,
        sets=cache_sets(recipe, len(s.train.input_ids)),
        **({"served": served, "batch_size": endpoint.concurrency} if endpoint else {}),
    )


def live_teacher(recipe: LMRecipe, s: TeacherSource, accelerator: Accelerator) -> nn.Module:
    """The teacher a live signal runs: whole, on the device; or with ``teacher.shard`` under several processes a copy
    sharded over them (the whole teacher stays on the CPU for validation and the report, which rank 0 writes alone)."""
    if recipe.teacher.shard and (accelerator.num_processes > 1 or torch.distributed.is_initialized()):
        teacher = parallel.shard_frozen(copy.deepcopy(s.teacher))
        units = len(parallel.layer_units(teacher)) + 1
        world = torch.distributed.get_world_size()
        accelerator.print(f"teacher: sharded over {world} process{'es' if world > 1 else ''}, {units} units")
        return teacher
    return s.teacher.to(accelerator.device)


def lm_signal(recipe: LMRecipe, out: Path, s: TeacherSource, accelerator: Accelerator):
    """The KD term of the distilled student, as ``distill.signal`` (and ``distill.cross_tokenizer``) choose it."""
    d = recipe.distill
    if s.teacher_view is not None and d.signal == "live":
        teacher = s.teacher.to(accelerator.device)
        return CrossTokenizerSignal(d.cross_tokenizer, s.teacher_view, d.temperature, teacher=teacher)
    if d.signal == "cache":
        with accelerator.main_process_first():  # the main process builds it, the others open it
            cache = open_cache(recipe, out, s, accelerator.device)
        if s.teacher_view is not None:
            return CrossTokenizerSignal(d.cross_tokenizer, s.teacher_view, d.temperature, cache=cache)
        return SparseSignal(cache.lookup, d.temperature)  # skipped blocks (served teacher) get no KD
    if d.signal == "live":
        return LiveLMSignal(live_teacher(recipe, s, accelerator), d.loss, d.temperature, d.divergence_kwargs())
    return SparseSignal(lambda rows, epoch: s.train.recorded[rows], d.temperature)  # recorded: with the blocks
