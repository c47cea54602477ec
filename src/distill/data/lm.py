"""Token blocks of a causal-LM recipe's data: read the source, tokenize, split off the held-out part, cap both
splits, and hold out the validation blocks."""

from __future__ import annotations

import numpy as np

from distill.data.fetch import fetch_shakespeare
from distill.data.splits import validation_rows
from distill.data.token_blocks import (
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
from distill.recipe import LMDataSpec


def read_lm_source(spec: LMDataSpec, tokenizer, *, with_texts: bool = False) -> TokenData:
    """Every block of the source: packed plain text, or prompt/response pairs (prompts masked). ``with_texts``: keep
    each block's text and its tokens' character spans (plain text only)."""
    if spec.source in {"shakespeare", "text", "hf_dataset"}:
        if spec.source == "hf_dataset":
            texts = read_hf_dataset(need_path(spec), split=spec.split, text_field=spec.text_field)
        elif spec.source == "text":
            texts = read_text_files(need_path(spec))
        else:  # shakespeare: a folder given, else the corpus fetched (and checksummed) into the cache
            texts = read_text_files(spec.path or fetch_shakespeare())
        return pack_text(texts, tokenizer, spec.block_size, with_texts=with_texts)
    if spec.source == "jsonl":
        pairs = read_jsonl_pairs(need_path(spec), spec.prompt_field, spec.response_field)
    else:
        pairs = read_hf_pairs(
            need_path(spec), split=spec.split, prompt_field=spec.prompt_field, response_field=spec.response_field
        )
    return encode_pairs(pairs, tokenizer, spec.block_size, chat_template=spec.chat_template)


def split_lm_data(data: TokenData, spec: LMDataSpec, seed: int) -> tuple[TokenData, TokenData]:
    """(training blocks, held-out blocks), each capped by the recipe's limits."""
    train, heldout = split_holdout(data, spec.heldout_fraction, seed)
    return sample_blocks(train, spec.limit_train_blocks, seed), sample_blocks(heldout, spec.limit_heldout_blocks, seed)


def split_validation(train: TokenData, fraction: float, seed: int) -> tuple[TokenData, TokenData | None]:
    """(training blocks, validation blocks): ``fraction`` of the training blocks held out (seeded, in order) to
    validate every stage and check the teacher; (``train``, None) for ``fraction`` 0."""
    if not fraction > 0:
        return train, None
    held_count = max(1, round(fraction * len(train)))
    if not 0.0 < fraction < 1.0 or held_count >= len(train):
        raise DistillError(
            f"holding out fraction {fraction} of {len(train)} blocks leaves an empty side; "
            "use a fraction between 0 and 1 and more data (or a smaller block size)"
        )
    held = validation_rows(len(train), fraction, seed)
    keep = np.ones(len(train), dtype=bool)
    keep[held] = False
    return train.subset(np.flatnonzero(keep)), train.subset(held)


def load_lm_data(spec: LMDataSpec, tokenizer, seed: int, *, with_texts: bool = False) -> tuple[TokenData, TokenData]:
    return split_lm_data(read_lm_source(spec, tokenizer, with_texts=with_texts), spec, seed)


def sample_blocks(data: TokenData, limit: int | None, seed: int) -> TokenData:
    """At most ``limit`` blocks drawn across the whole corpus (not its first works), in corpus order."""
    if not limit or limit >= len(data):
        return data
    return data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[:limit]))


def need_path(spec: LMDataSpec) -> str:
    if not spec.path:
        raise DistillError(f"data.source {spec.source} needs data.path")
    return spec.path
