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

# Stands for the eos between two documents in a block's text: one character, so that the eos tokens of two tokenizers
# span the same characters and line up like any other token.
SEPARATOR = "\x00"


@dataclass(frozen=True)
class BlockTexts:
    """What each block of packed text reads: its text (documents joined by ``SEPARATOR``) and the character span
    [starts, ends) of each of its tokens in that text. Cross-tokenizer distillation tokenizes the same text with the
    teacher's tokenizer and lines the two up by these spans."""

    texts: list[str]
    starts: np.ndarray  # int64 [N, S]
    ends: np.ndarray  # int64 [N, S]
    # [N]: where the token after the block starts, in the block's text: before the end of the block's last token when
    # that token ends inside a character (a byte-level tokenizer split it), whose other bytes open the next block
    following: np.ndarray

    def subset(self, idx: np.ndarray) -> BlockTexts:
        return BlockTexts([self.texts[i] for i in idx], self.starts[idx], self.ends[idx], self.following[idx])


@dataclass(frozen=True)
class TokenData:
    input_ids: np.ndarray  # int32 [N, S]
    labels: np.ndarray  # int64 [N, S]; labels[t] is the token at t, or IGNORE_INDEX where t is not trained
    attention_mask: np.ndarray  # int8 [N, S]; 0 on padding
    dropped: int = 0  # pairs left out by encode_pairs because the prompt filled max_length
    # The teacher's log-probs stored with the traces, when trained on (``teachers.recorded.RecordedTargets``): any
    # row-aligned targets with ``subset``, kept here so that they travel with their rows through every split.
    recorded: object | None = None
    texts: BlockTexts | None = None  # the text of each block and its tokens' character spans (``pack_text``)

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices) -> TokenData:
        idx = np.asarray(indices, dtype=np.int64)
        recorded = None if self.recorded is None else self.recorded.subset(idx)
        texts = None if self.texts is None else self.texts.subset(idx)
        return TokenData(
            self.input_ids[idx], self.labels[idx], self.attention_mask[idx], recorded=recorded, texts=texts
        )

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


def pack_text(texts: list[str], tokenizer, block_size: int, *, with_texts: bool = False) -> TokenData:
    """Tokenize, join documents with eos, and cut the stream into full blocks (the remainder is dropped).
    ``with_texts``: also keep each block's text and its tokens' character spans (``TokenData.texts``)."""
    eos = _eos_id(tokenizer)
    if with_texts:
        stream, spans = _stream_with_spans(texts, tokenizer, eos)
    else:
        stream = [token for ids in _tokenize(tokenizer, texts) for token in [*ids, eos]]
    if block_size < 1 or len(stream) < block_size:
        raise DistillError(
            f"the text has {len(stream)} tokens, fewer than one block of data.block_size={block_size}; "
            "lower data.block_size or give more text"
        )
    blocks = len(stream) // block_size
    ids = np.asarray(stream[: blocks * block_size], dtype=np.int64).reshape(blocks, block_size)
    block_texts = None
    if with_texts:
        corpus = SEPARATOR.join(texts) + SEPARATOR
        all_starts = np.append(spans[0], len(corpus))  # after the last token: the end of the text
        starts, ends = (np.asarray(a[: blocks * block_size], dtype=np.int64).reshape(blocks, block_size) for a in spans)
        first, last = starts[:, 0], ends[:, -1]
        texts_of = [corpus[lo:hi] for lo, hi in zip(first, last, strict=True)]
        following = all_starts[block_size : (blocks + 1) * block_size : block_size] - first
        block_texts = BlockTexts(texts_of, starts - first[:, None], ends - first[:, None], following)
    return TokenData(ids.astype(np.int32), ids, np.ones(ids.shape, dtype=np.int8), texts=block_texts)


ROUND_TRIP_FIX = (
    "cross-tokenizer distillation compares both tokenizers on the same characters: use one that keeps the text "
    "as it is (byte-level BPE, or SentencePiece with byte fallback), without lowercasing or unknown tokens"
)


def tokenizer_name(tokenizer) -> str:
    return f"the tokenizer of {tokenizer.name_or_path}" if tokenizer.name_or_path else f"the {type(tokenizer).__name__}"


def round_trip_error(tokenizer, texts: list[str], ids: list[list[int]]) -> str | None:
    """Where the first text that ``ids`` do not spell back differs (None: all do). Whitespace is left out of the
    comparison: WordPiece and some normalisers drop or fold it, which costs the alignment nothing."""
    decoded = tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)
    for number, (text, back) in enumerate(zip(texts, decoded, strict=True)):
        want, got = ([i for i, c in enumerate(t) if not c.isspace()] for t in (text, back))  # where the rest is
        differs = next((k for k, (i, j) in enumerate(zip(want, got, strict=False)) if text[i] != back[j]), None)
        if differs is None and len(want) == len(got):
            continue
        k = min(len(want), len(got)) if differs is None else differs
        i, j = (w[k] if k < len(w) else len(t) for w, t in ((want, text), (got, back)))
        return f"text {number} reads back {back[j : j + 16]!r} where it has {text[i : i + 16]!r}"
    return None


def _stream_with_spans(texts: list[str], tokenizer, eos: int) -> tuple[list[int], tuple[list[int], list[int]]]:
    """The packed token stream and each token's character span in ``SEPARATOR.join(texts) + SEPARATOR`` (an eos
    spans the separator after its document). Needs a fast tokenizer (``teachers.cross_tokenizer`` checks first)."""
    for number, text in enumerate(texts):
        if SEPARATOR in text:
            raise DistillError(
                f"document {number} holds a NUL character, which stands for the end of a document here; remove it"
            )
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False) if texts else None
    if texts and (problem := round_trip_error(tokenizer, texts, encoded["input_ids"])):
        raise DistillError(f"{tokenizer_name(tokenizer)} cannot round-trip the text: {problem}; {ROUND_TRIP_FIX}")
    stream, starts, ends, base = [], [], [], 0
    for number, text in enumerate(texts):
        offsets = encoded["offset_mapping"][number]
        stream += [*encoded["input_ids"][number], eos]
        starts += [base + start for start, _ in offsets] + [base + len(text)]
        ends += [base + end for _, end in offsets] + [base + len(text) + 1]
        base += len(text) + 1
    return stream, (starts, ends)


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
