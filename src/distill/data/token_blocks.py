"""Token data for language models: packed plain text and prompt/response pairs.

Every source ends as a ``TokenData`` in the Hugging Face convention: labels are not shifted (the model
shifts), and ``IGNORE_INDEX`` marks positions that are neither trained nor distilled (prompts, padding).
"""

from __future__ import annotations

import glob
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill.errors import DistillError
from distill.losses import IGNORE_INDEX


@dataclass(frozen=True)
class TokenData:
    input_ids: np.ndarray  # int32 [N, S]
    labels: np.ndarray  # int64 [N, S]; labels[t] is the token at t, or IGNORE_INDEX where t is not trained
    attention_mask: np.ndarray  # int8 [N, S]; 0 on padding
    dropped: int = 0  # pairs left out by encode_pairs because the prompt filled max_length
    # The teacher's log-probs stored with the traces, when trained on (``teachers.recorded.RecordedTargets``): any
    # row-aligned targets with ``subset``, kept here so that they travel with their rows through every split.
    recorded: object | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices) -> TokenData:
        idx = np.asarray(indices, dtype=np.int64)
        recorded = None if self.recorded is None else self.recorded.subset(idx)
        return TokenData(self.input_ids[idx], self.labels[idx], self.attention_mask[idx], recorded=recorded)

    def fingerprint(self) -> str:
        """Content hash of the arrays: a teacher cache is only valid for these exact tokens."""
        digest = hashlib.sha256()
        for array in (self.input_ids, self.labels, self.attention_mask):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()[:16]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DistillError("the tokenizer has no eos token; pick a tokenizer that defines one")
    return int(tokenizer.eos_token_id)


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: long documents are cut into blocks later, so the "longer than max length" warning is noise.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def pack_text(texts: list[str], tokenizer, block_size: int) -> TokenData:
    """Tokenize, join documents with eos, and cut the stream into full blocks (the remainder is dropped)."""
    eos = _eos_id(tokenizer)
    stream = [token for ids in _tokenize(tokenizer, texts) for token in [*ids, eos]]
    if block_size < 1 or len(stream) < block_size:
        raise DistillError(
            f"the text has {len(stream)} tokens, fewer than one block of data.block_size={block_size}; "
            "lower data.block_size or give more text"
        )
    blocks = len(stream) // block_size
    ids = np.asarray(stream[: blocks * block_size], dtype=np.int64).reshape(blocks, block_size)
    return TokenData(ids.astype(np.int32), ids, np.ones(ids.shape, dtype=np.int8))


def read_text_files(path: str | Path) -> list[str]:
    """Read a .txt file, every *.txt in a folder (sorted), or every file a glob matches (sorted)."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DistillError(f"folder {path} has no .txt files")
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not files:
            raise DistillError(f"text path {path} does not exist and matches no files")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DistillError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return texts


def prompt_token_ids(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """Prompt ids, wrapped in the tokenizer's chat template (generation prompt added) when asked."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
    elif chat_template:
        warnings.warn("the tokenizer has no chat template; prompts are used as plain text", stacklevel=3)
    return _tokenize(tokenizer, prompts)


def encode_pairs(pairs: list[tuple[str, str]], tokenizer, max_length: int, *, chat_template: bool = False) -> TokenData:
    """Encode prompt + response + eos, right-padded to the longest pair (at most ``max_length``).

    Labels are IGNORE_INDEX on prompt and padding tokens, so only responses are trained and distilled.
    A pair whose prompt alone fills ``max_length`` has nothing to learn from; it is dropped with a warning.
    """
    if not pairs:
        raise DistillError("no prompt/response pairs to encode")
    prompts = prompt_token_ids(tokenizer, [prompt for prompt, _ in pairs], chat_template)
    responses = _tokenize(tokenizer, [response for _, response in pairs])
    rows, _ = prompt_response_rows(prompts, responses, tokenizer, max_length)
    return padded_token_data(rows, tokenizer, len(pairs), max_length)


def prompt_response_rows(
    prompts: list[list[int]], responses: list[list[int]], tokenizer, max_length: int
) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """(ids, labels) of prompt + response + eos cut to ``max_length`` (eos not repeated when the response
    already ends with it; labels IGNORE_INDEX on the prompt), and the indices of the pairs kept: a prompt that
    fills ``max_length`` leaves nothing to learn."""
    eos = _eos_id(tokenizer)
    rows, kept = [], []
    for index, (prompt_ids, response_ids) in enumerate(zip(prompts, responses, strict=True)):
        if len(prompt_ids) >= max_length:
            continue
        ending = [] if response_ids and response_ids[-1] == eos else [eos]
        ids = [*prompt_ids, *response_ids, *ending][:max_length]
        rows.append((ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]))
        kept.append(index)
    return rows, kept


def padded_token_data(rows: list[tuple[list[int], list[int]]], tokenizer, pairs: int, max_length: int) -> TokenData:
    """Right-pad (ids, labels) rows to the longest; warn about (or refuse) pairs left out."""
    dropped = pairs - len(rows)
    if not rows:
        raise DistillError(
            f"all {pairs} prompt/response pairs have prompts of max_length={max_length} tokens or more; "
            "raise max_length (data.block_size) or shorten the prompts"
        )
    if dropped:
        warnings.warn(f"dropped {dropped} of {pairs} pairs whose prompt fills max_length={max_length}", stacklevel=3)
    pad = _eos_id(tokenizer) if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad, dtype=np.int32)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int8)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, : len(ids)], labels[i, : len(ids)], mask[i, : len(ids)] = ids, labs, 1
    return TokenData(input_ids, labels, mask, dropped=dropped)


def read_jsonl(path, what: str = "JSONL file") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; a missing or unreadable file or a line that is not
    JSON stops with one line naming it (``what`` names the file in the message)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DistillError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DistillError(f"{what} {path} cannot be read: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DistillError(f"{path} line {number} is not valid JSON ({exc.msg}); fix or delete that line") from None


def read_jsonl_pairs(path, prompt_field: str = "prompt", response_field: str = "response") -> list[tuple[str, str]]:
    """Read one JSON object per line (blank lines skipped) into (prompt, response) pairs."""
    path = Path(path).expanduser()
    pairs = []
    for number, record in read_jsonl(path):
        if not isinstance(record, dict):
            raise DistillError(
                f"{path} line {number} must be a JSON object with {prompt_field!r} and {response_field!r}"
            )
        for field in (prompt_field, response_field):
            if not isinstance(record.get(field), str):
                problem = "has no field" if field not in record else "needs a string in field"
                raise DistillError(f"{path} line {number} {problem} {field!r}; fields are {sorted(record)}")
        pairs.append((record[prompt_field], record[response_field]))
    if not pairs:
        raise DistillError(f"JSONL file {path} has no records")
    return pairs


def _load_hf(path, split: str):
    import datasets  # lazy: importing datasets is slow and only these readers need it

    try:
        loaded = datasets.load_from_disk(str(Path(path).expanduser()))
    except (FileNotFoundError, ValueError) as exc:
        raise DistillError(f"{path} is not a dataset saved with save_to_disk: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DistillError(f"dataset {path} has no split {split!r}; splits are {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def _columns(dataset, path, fields: tuple[str, ...]) -> list[list[str]]:
    for field in fields:
        if field not in dataset.column_names:
            raise DistillError(f"dataset {path} has no column {field!r}; columns are {dataset.column_names}")
    return [list(dataset[field]) for field in fields]


def read_hf_dataset(path, *, split: str = "train", text_field: str = "text") -> list[str]:
    """Texts from a ``datasets`` folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    dataset = _load_hf(path, split)
    return _columns(dataset, path, (text_field,))[0]


def read_hf_pairs(
    path, *, split: str = "train", prompt_field: str = "prompt", response_field: str = "response"
) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a ``datasets`` folder written by ``save_to_disk``."""
    dataset = _load_hf(path, split)
    prompts, responses = _columns(dataset, path, (prompt_field, response_field))
    return list(zip(prompts, responses, strict=True))


def split_holdout(data: TokenData, fraction: float, seed: int) -> tuple[TokenData, TokenData]:
    """Deterministically hold out about ``fraction`` of the rows (blocks); both sides keep their order."""
    held_count = max(1, round(fraction * len(data)))
    if not 0.0 < fraction < 1.0 or held_count >= len(data):
        raise DistillError(
            f"holding out fraction {fraction} of {len(data)} blocks leaves an empty side; "
            "use a fraction between 0 and 1 and more data (or a smaller block size)"
        )
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(order[held_count:])), data.subset(np.sort(order[:held_count]))
