"""Multi-step arithmetic problems with worked solutions, generated from a seed: the reasoning-distillation task
that needs no download. ``37+48+15-22=`` is solved as ``37+48=85;85+15=100;100-22=78;answer 78``: every step
is one addition or subtraction, which a small model learns; the answer in one go is much harder.

With ``modulus`` every result is reduced (``7+5-9+8=`` mod 10 is ``7+5=2;2-9=3;3+8=1;answer 1``): each step is
then one entry of a small table, learnt in a few hundred steps, while the answer in one go is a sum of every
term, the parity-like function small transformers fail to learn without writing the steps.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARS = "0123456789+-=;answer "
SPECIAL = ["<pad>", "<eos>", "<bos>"]


def problem(rng: random.Random, terms: int, digits: int, modulus: int | None = None) -> dict:
    low = 10 ** (digits - 1) if modulus is None else 0
    high = 10**digits if modulus is None else min(10**digits, modulus)
    numbers = [rng.randrange(low, high) for _ in range(terms)]
    signs = [rng.choice("+-") for _ in range(terms - 1)]
    total, steps = numbers[0], []
    for sign, number in zip(signs, numbers[1:], strict=True):
        result = total + number if sign == "+" else total - number
        if modulus is not None:
            result %= modulus
        steps.append(f"{total}{sign}{number}={result}")
        total = result
    prompt = str(numbers[0]) + "".join(f"{s}{n}" for s, n in zip(signs, numbers[1:], strict=True)) + "="
    return {"prompt": prompt, "answer": str(total), "solution": ";".join(steps) + f";answer {total}"}


def make_problems(
    n: int,
    seed: int,
    *,
    terms: int = 4,
    digits: int = 2,
    modulus: int | None = None,
    exclude: set[str] | None = None,
) -> list[dict]:
    """``n`` distinct problems (none of whose prompts is in ``exclude``), ids ``<seed>-<i>``."""
    rng, seen, problems = random.Random(seed), set(exclude or ()), []
    while len(problems) < n:
        p = problem(rng, terms, digits, modulus)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            problems.append({"id": f"{seed}-{len(problems)}", **p})
    return problems


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of ``CHARS`` (ids after <pad>, <eos>, <bos>)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(set(CHARS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
