"""A teacher whose tokenizer is not the student's (``distill.cross_tokenizer: uld | align``).

The training blocks are the student's tokens; each keeps the text it reads and its tokens' character spans
(``pack_text(with_texts=True)``). The teacher tokenizes that same text (``teacher_view``), and the two token sequences
are lined up by where their tokens *end* (``align_offsets``): a student position and a teacher position pair up when
both have read exactly the same characters. Between two such shared boundaries each side has one token (the spans
coincide) or several (a span, compared through the chain rule). ``distill.losses.cross_tokenizer`` holds the math;
this module finds the positions and the teacher's side of each term, live or from a cache that stores just that:

- at every paired position, the teacher's k largest log-probs and its remaining mass (what ULD compares);
- at coinciding positions, its distribution carried over to the student's vocabulary (``token_map``): its k most
  likely student tokens and the rest (``align``; live, all of them);
- for every span, the teacher's log-probability of the span's text (``align``).

Tokens are compared by their text once each tokenizer's markers are undone (byte-level BPE's byte alphabet,
SentencePiece's ▁ and <0xNN> bytes, WordPiece's ##; a WordPiece word start is read as following a space, which is
right after whitespace and not after punctuation). A teacher token the student has too (the same text) counts for
it; one the student lacks counts for the student token its text begins with (the longest such), which is where the
student would write that text: a teacher's mass on "Ġlord" belongs to the student's "Ġlo" when the student has no
"Ġlord", not to a tail the student could only match with its own odd tokens. Teacher tokens no student token begins
(specials without a namesake) and student tokens no teacher token lands on form the tail bucket. With one tokenizer
every token maps to itself: forward KL exactly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.data.token_blocks import (
    ROUND_TRIP_FIX,
    SEPARATOR,
    BlockTexts,
    TokenData,
    round_trip_error,
    tokenizer_name,
)
from distill.devices import to_numpy
from distill.errors import DistillError
from distill.io import atomic_path, folder_lock, sha256_file, write_json
from distill.losses.cross_tokenizer import merge_spans, pair_loss, span_kl, token_log_probs
from distill.losses.divergences import log_probs
from distill.losses.sparse import chunked_cross_entropy
from distill.models.causal_lm import head_of, last_hidden
from distill.teachers.lm_signals import StudentTokens
from distill.teachers.store import check_file, check_made_for, read_meta

# ---- the teacher's tokens in the student's vocabulary ----


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte: printable bytes stand for themselves, the others were moved to
    256 and up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + n): b for n, b in enumerate(moved)}


BYTE_DECODER = _byte_decoder()


def spellings(tokenizer, vocab_size: int) -> dict[int, bytes | str]:
    """Token id → the bytes it stands for; a special token → its name (str), so that it matches only a special token
    of the same name, and eos → the separator it stands for between documents."""
    decoder = repr(getattr(tokenizer.backend_tokenizer, "decoder", ""))
    byte_level, wordpiece = "ByteLevel" in decoder, "WordPiece" in decoder
    special = set(tokenizer.all_special_ids)
    out: dict[int, bytes | str] = {}
    for token, index in tokenizer.get_vocab().items():
        if index >= vocab_size:
            continue
        if index in special:
            out[index] = token
        elif byte_level and all(c in BYTE_DECODER for c in token):
            out[index] = bytes(BYTE_DECODER[c] for c in token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # SentencePiece byte fallback
            out[index] = bytes([int(token[3:5], 16)])
        elif wordpiece:
            out[index] = (token[2:] if token.startswith("##") else " " + token).encode()
        else:
            out[index] = token.replace("▁", " ").encode()
    if tokenizer.eos_token_id is not None:
        out[tokenizer.eos_token_id] = SEPARATOR
    return out


def token_map(teacher_tokenizer, student_tokenizer, teacher_vocab: int, student_vocab: int):
    """(teacher ids, student ids): each teacher token and the student token it counts for — the one that spells the
    same, else the longest one its text begins with (eos: eos). Teacher tokens with neither are left out."""
    student: dict[bytes | str, int] = {}
    for index, text in sorted(spellings(student_tokenizer, student_vocab).items(), reverse=True):
        student[text] = index  # the lowest id of two that spell the same
    pairs = {}
    for index, text in spellings(teacher_tokenizer, teacher_vocab).items():
        if text in student:
            pairs[index] = student[text]
        elif isinstance(text, bytes):
            begins = next((text[:n] for n in range(len(text) - 1, 0, -1) if text[:n] in student), None)
            if begins is not None:
                pairs[index] = student[begins]
    order = sorted(pairs)
    return np.asarray(order, dtype=np.int64), np.asarray([pairs[t] for t in order], dtype=np.int64)


# ---- lining the two token sequences up ----


@dataclass(frozen=True)
class Alignment:
    """One block's positions (a position predicts the token after it) lined up by character offsets.

    ``pair_s[k]`` and ``pair_t[k]`` have read the same characters; what follows them up to the next shared boundary is
    one token on each side (``exact[k]``: the spans coincide) or a span, numbered by k. ``span_s`` / ``span_t`` are
    the positions whose tokens make up spans, ``span_s_id`` / ``span_t_id`` the span each belongs to."""

    pair_s: np.ndarray
    pair_t: np.ndarray
    exact: np.ndarray
    span_s: np.ndarray
    span_s_id: np.ndarray
    span_t: np.ndarray
    span_t_id: np.ndarray


def _boundaries(starts: np.ndarray, ends: np.ndarray, after: int) -> dict[int, int]:
    """Character offset → the last token that ends there at a character boundary. A token ends inside a character
    when the next one starts before its end (``after``: where the token after the last one starts): byte-level
    tokenizers split a multi-byte character over several tokens, each reported with the whole character's span."""
    following = np.append(starts[1:], after)
    at = np.flatnonzero(following >= ends)
    return {int(ends[i]): int(i) for i in at}


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every integer of [lo[k], hi[k]) and the k it came from."""
    counts = hi - lo
    which = np.repeat(np.arange(len(lo)), counts)
    return lo[which] + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts), which


def align_offsets(s_starts, s_ends, t_starts, t_ends, s_after=None, s_text=None, t_text=None) -> Alignment:
    """Line up a student and a teacher tokenization of one text by their tokens' character spans (``s_after``: where
    the student's token after these starts, when its last one may end inside a character; the teacher's last token
    ends with the text). With what each token spells (``s_text``, ``t_text``), a stretch both sides cut into the same
    tokens inside a character (a multi-byte character split the same way) is paired token by token."""
    s_starts, s_ends, t_starts, t_ends = (np.asarray(a, dtype=np.int64) for a in (s_starts, s_ends, t_starts, t_ends))
    s_at = _boundaries(s_starts, s_ends, s_ends[-1] if s_after is None else s_after)
    t_at = _boundaries(t_starts, t_ends, t_ends[-1])
    common = sorted(s_at.keys() & t_at.keys())
    i, j = [s_at[c] for c in common], [t_at[c] for c in common]
    if s_text is not None and len(i) > 1:
        split_i, split_j = i[:1], j[:1]
        for a, b, c, d in zip(i[:-1], i[1:], j[:-1], j[1:], strict=True):
            if 1 < b - a == d - c and all(s_text[a + m] == t_text[c + m] for m in range(1, b - a + 1)):
                split_i, split_j = split_i + list(range(a + 1, b + 1)), split_j + list(range(c + 1, d + 1))
            else:
                split_i, split_j = [*split_i, b], [*split_j, d]
        i, j = split_i, split_j
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    i0, i1, j0, j1 = i[:-1], i[1:], j[:-1], j[1:]
    exact = (i1 - i0 == 1) & (j1 - j0 == 1)
    span = np.flatnonzero(~exact)
    span_s, s_id = _ranges(i0[span], i1[span])
    span_t, t_id = _ranges(j0[span], j1[span])
    return Alignment(i0, j0, exact, span_s, span[s_id], span_t, span[t_id])


@dataclass
class TeacherView:
    """The teacher's tokens of each training block's text and the alignment of each block."""

    ids: np.ndarray  # int64 [N, T], right-padded
    lengths: np.ndarray  # int64 [N]
    alignments: list[Alignment]
    mapping: tuple[np.ndarray, np.ndarray]  # (teacher ids, student ids): ``token_map``
    teacher_vocab: int
    student_vocab: int

    def key(self) -> str:
        """What a cache of the teacher's side depends on beyond teacher and student tokens: the token map."""
        digest = hashlib.sha256(self.mapping[0].tobytes() + self.mapping[1].tobytes())
        return digest.hexdigest()[:8]


def check_offsets(teacher_tokenizer, student_tokenizer) -> None:
    """One line for a tokenizer that cannot say where its tokens are in the text (a slow, Python one)."""
    for role, tokenizer in (("teacher", teacher_tokenizer), ("student", student_tokenizer)):
        if not getattr(tokenizer, "is_fast", False):
            raise DistillError(
                f"the {role} tokenizer ({type(tokenizer).__name__}) gives no character offsets: it is a slow, Python "
                "tokenizer; distill.cross_tokenizer lines tokens up by their offsets: save its model folder with a "
                "fast tokenizer (tokenizer.json: AutoTokenizer.from_pretrained(folder, use_fast=True)"
                ".save_pretrained(folder))"
            )


def teacher_view(
    data: TokenData, teacher_tokenizer, student_tokenizer, *, teacher_vocab: int, student_vocab: int
) -> TeacherView:
    """Tokenize each block's text (``data.texts``) with the teacher's tokenizer and line it up with the student's."""
    check_offsets(teacher_tokenizer, student_tokenizer)
    blocks: BlockTexts = data.texts
    eos = teacher_tokenizer.eos_token_id
    if eos is None:
        raise DistillError("the teacher tokenizer has no eos token; pick a tokenizer that defines one")
    pieces = [text.split(SEPARATOR) for text in blocks.texts]
    flat = [piece for block in pieces for piece in block]
    encoded = teacher_tokenizer(flat, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if problem := round_trip_error(teacher_tokenizer, flat, encoded["input_ids"]):
        raise DistillError(
            f"{tokenizer_name(teacher_tokenizer)} cannot round-trip the text: {problem}; {ROUND_TRIP_FIX}"
        )
    s_text, t_text = (
        spellings(tok, v) for tok, v in ((student_tokenizer, student_vocab), (teacher_tokenizer, teacher_vocab))
    )
    rows, alignments, cursor = [], [], 0
    for b, block in enumerate(pieces):
        ids, starts, ends, base = [], [], [], 0
        for n, piece in enumerate(block):
            offsets = encoded["offset_mapping"][cursor]
            ids += encoded["input_ids"][cursor]
            starts += [base + a for a, _ in offsets]
            ends += [base + e for _, e in offsets]
            cursor += 1
            base += len(piece)
            if n < len(block) - 1:  # the separator: the eos between two documents
                ids.append(eos)
                starts.append(base)
                ends.append(base + 1)
                base += 1
        rows.append(ids)
        texts = ([s_text.get(int(t), -1) for t in data.input_ids[b]], [t_text.get(t, -2) for t in ids])
        alignments.append(align_offsets(blocks.starts[b], blocks.ends[b], starts, ends, blocks.following[b], *texts))
    width = max(len(r) for r in rows)
    pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else eos
    padded = np.full((len(rows), width), pad, dtype=np.int64)
    for b, ids in enumerate(rows):
        padded[b, : len(ids)] = ids
    mapping = token_map(teacher_tokenizer, student_tokenizer, teacher_vocab, student_vocab)
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    return TeacherView(padded, lengths, alignments, mapping, teacher_vocab, student_vocab)


@dataclass
class BatchAlignment:
    """A micro-batch's alignment as flat indices: student positions over [B·(S−1)], teacher ones over [B·(T−1)]."""

    pair_s: Tensor
    pair_t: Tensor
    exact: Tensor
    span_s: Tensor
    span_s_id: Tensor
    span_t: Tensor
    span_t_id: Tensor
    spans: int  # spans are numbered by their pair: 0 .. spans − 1
    width: int  # T of the teacher's rows


def batch_alignment(view: TeacherView, rows: np.ndarray, student_positions: int) -> BatchAlignment:
    """The rows' alignments, each row's positions moved to its place in the flat batch and its spans renumbered."""
    width = int(view.lengths[rows].max())
    blocks = [view.alignments[row] for row in rows]
    student, teacher = np.arange(len(rows)) * student_positions, np.arange(len(rows)) * (width - 1)
    first = np.cumsum([0, *(len(a.pair_s) for a in blocks)])  # each row's first pair (spans are numbered by pair)
    shift = {"pair_s": student, "pair_t": teacher, "exact": np.zeros(len(rows), np.int64), "span_s": student,
             "span_s_id": first, "span_t": teacher, "span_t_id": first}  # fmt: skip
    joined = {
        name: torch.from_numpy(
            np.concatenate([getattr(a, name) + by[b] for b, a in enumerate(blocks)]).astype(np.int64)
        )
        for name, by in shift.items()
    }
    return BatchAlignment(**{**joined, "exact": joined["exact"].bool()}, spans=int(first[-1]), width=width)


# ---- the teacher's side of each term: live, or from the cache ----


def _top(log_t: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest log-probs of each row and the log of the other mass (what ULD needs of the teacher)."""
    top, at = log_t.topk(min(k, log_t.shape[-1]), dim=-1)
    return top, torch.logsumexp(log_t.scatter(-1, at, -math.inf), dim=-1)


class _Projection:
    """The teacher's distribution carried over to the student's tokens (``token_map``)."""

    def __init__(self, mapping: tuple[np.ndarray, np.ndarray], device):
        image = np.unique(mapping[1])  # the student tokens some teacher token counts for
        self.teacher = torch.from_numpy(mapping[0]).to(device)
        self.slot = torch.from_numpy(np.searchsorted(image, mapping[1])).to(device)
        self.image = torch.from_numpy(image).to(device)

    def __call__(self, log_t: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """(student ids, log-probs, log of the rest): over every student token in the image (ids [K], the same for
        every row), or each row's k most likely (ids [n, k]); the rest holds what no student token gets."""
        mass = log_t.new_zeros(len(log_t), len(self.image)).index_add_(1, self.slot, log_t[:, self.teacher].exp())
        logp, ids = mass.log(), self.image
        rest = torch.logsumexp(log_t.index_fill(1, self.teacher, -math.inf), dim=-1)
        if k is not None and k < len(ids):
            top, at = logp.topk(k, dim=-1)
            rest = torch.logsumexp(torch.cat([rest[:, None], logp.scatter(-1, at, -math.inf)], dim=-1), dim=-1)
            logp, ids = top, ids[at]
        return ids, logp, rest


class _LiveTeacher:
    """The teacher run over a micro-batch's blocks (its own tokens); its targets computed a chunk of positions at a
    time, so [n, Vt] teacher log-probs exist for one chunk only."""

    def __init__(self, teacher: nn.Module, view: TeacherView, rows: np.ndarray, al: BatchAlignment, temperature: float):
        device = next(teacher.parameters()).device
        ids = torch.from_numpy(view.ids[rows, : al.width]).to(device)
        attention = (torch.arange(al.width)[None] < torch.from_numpy(view.lengths[rows])[:, None]).long().to(device)
        with torch.no_grad():
            hidden = last_hidden(teacher, ids, attention)[:, :-1]
        self.hidden, self.next = hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
        self.weight, self.bias = head_of(teacher)
        self.view, self.al, self.temperature, self.device = view, al, temperature, device
        self.projection = _Projection(view.mapping, device)

    @torch.no_grad()
    def log_probs(self, positions: Tensor) -> Tensor:
        v = self.view.teacher_vocab
        z = nn.functional.linear(
            self.hidden[positions.to(self.device)], self.weight[:v], None if self.bias is None else self.bias[:v]
        )
        return log_probs(z.float(), self.temperature)

    def uld(self, pairs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return _top(self.log_probs(self.al.pair_t[pairs]), k)

    def projected(self, pairs: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor]:
        return self.projection(self.log_probs(self.al.pair_t[pairs]), k)

    def spans(self, keep: Tensor, chunk_size: int) -> Tensor:
        """The teacher's log-probability of each span's text (its tokens' log-probs summed); 0 where not kept."""
        al = self.al
        on = keep[al.span_t_id]
        positions, span = al.span_t[on], al.span_t_id[on]
        logp = [
            self.log_probs(chunk).gather(-1, self.next[chunk.to(self.device)][:, None])[:, 0]
            for chunk in positions.split(chunk_size)
        ]
        values = torch.cat(logp) if logp else torch.zeros(0, device=self.device)
        return merge_spans(values, span.to(self.device), al.spans)


FORMAT = "distill.cross_tokenizer/1"
FIX = "rebuild it with `distill cache RECIPE`"


def _record(k_top: int, k_map: int, student_vocab: int) -> np.dtype:
    ids = np.uint16 if student_vocab <= 1 << 16 else np.uint32
    return np.dtype(
        [
            ("top", np.float16, (k_top,)),
            ("top_rest", np.float16),
            ("ids", ids, (k_map,)),
            ("logp", np.float16, (k_map,)),
            ("rest", np.float16),
            ("span", np.float32),
        ]
    )


def cross_cache_dir(root: Path, teacher_id: str, data_id: str, view: TeacherView, k: int, temperature: float) -> Path:
    return root / f"xtok-teacher-{teacher_id}-data-{data_id}-{view.key()}-k{k}-T{temperature:g}"


class CrossTokenizerCache:
    """The teacher's side of every term over the training blocks, at the student positions they belong to
    ([N, S − 1] records, memory-mapped): at each paired position its top-k log-probs and rest (ULD), its top-k over
    its distribution carried over to the student's tokens and rest (align, where the spans coincide), and for a span
    its text's log-prob."""

    def __init__(self, path: Path, meta: dict, records: np.ndarray):
        self.path, self.meta, self.records = path, meta, records

    @classmethod
    def open(cls, path: Path, expected: dict, *, verify: bool) -> CrossTokenizerCache:
        what, file = "cross-tokenizer teacher cache", path / "targets.npy"
        meta = read_meta(path, what, FIX)
        check_made_for(meta, expected, path, what, f"delete it and {FIX}")
        check_file(file, what, FIX, size=meta.get("bytes"), sha256=meta.get("sha256") if verify else None)
        return cls(path, meta, np.load(file, mmap_mode="r"))

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The records of these blocks, flat: [len(rows)·(S − 1)]."""
        return np.asarray(self.records[rows]).reshape(-1)

    @property
    def bytes_per_token(self) -> int:
        return self.records.dtype.itemsize


def build_cross_cache(
    path: Path,
    teacher: nn.Module,
    data: TokenData,
    view: TeacherView,
    *,
    k: int,
    temperature: float,
    teacher_id: str,
    data_id: str,
    device,
    batch_size: int = 8,
    chunk_size: int = 512,
) -> CrossTokenizerCache:
    """Open the cache at ``path``, running the teacher over every training block first if it is not there."""
    positions = data.input_ids.shape[1] - 1
    k_top, k_map = min(k, view.teacher_vocab), min(k, len(np.unique(view.mapping[1])))
    expected = {
        "format": FORMAT,
        "teacher_id": teacher_id,
        "data_id": data_id,
        "mapping": view.key(),
        "k_top": k_top,
        "k_map": k_map,
        "temperature": float(temperature),
        "blocks": len(data),
        "positions": positions,
    }
    with folder_lock(path, "cross-tokenizer teacher cache"):  # a second build waits, then opens the first's
        if (path / "meta.json").exists():
            return CrossTokenizerCache.open(path, expected, verify=True)
        return _build(path, teacher, data, view, expected, k_top, k_map, temperature, device, batch_size, chunk_size)


def _build(path, teacher, data, view, expected, k_top, k_map, temperature, device, batch_size, chunk_size):
    positions = expected["positions"]
    teacher = teacher.to(device).eval()
    records = np.zeros((len(data), positions), dtype=_record(k_top, k_map, view.student_vocab))
    flat = records.reshape(-1)
    for lo in range(0, len(data), batch_size):
        rows = np.arange(lo, min(lo + batch_size, len(data)))
        al = batch_alignment(view, rows, positions)
        live = _LiveTeacher(teacher, view, rows, al, temperature)
        at = to_numpy(al.pair_s) + lo * positions
        for chunk in torch.arange(len(at)).split(chunk_size):
            log_t = live.log_probs(al.pair_t[chunk])
            ids, logp, rest = live.projection(log_t, k_map)
            top, top_rest = _top(log_t, k_top)
            values = {"top": top, "top_rest": top_rest, "ids": ids.expand(len(chunk), -1), "logp": logp, "rest": rest}
            for name, value in values.items():
                flat[name][at[to_numpy(chunk)]] = to_numpy(value)
        flat["span"][at] = to_numpy(live.spans(~al.exact, chunk_size))
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "targets.npy") as tmp, tmp.open("wb") as handle:
        np.save(handle, records)
    file = path / "targets.npy"
    write_json(path / "meta.json", {**expected, "bytes": file.stat().st_size, "sha256": sha256_file(file)})
    return CrossTokenizerCache.open(path, expected, verify=False)


class _CachedTeacher:
    """The same targets as ``_LiveTeacher``, read from the cache's records of a micro-batch's rows."""

    def __init__(self, cache: CrossTokenizerCache, rows: np.ndarray, al: BatchAlignment, device):
        self.records = cache.read(rows)[to_numpy(al.pair_s)]  # one record per pair
        self.al, self.device = al, device

    def _field(self, name: str, pairs: Tensor) -> Tensor:
        value = torch.from_numpy(np.asarray(self.records[name][to_numpy(pairs)]))
        return value.long() if name == "ids" else value.float()

    def uld(self, pairs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self._field("top", pairs).to(self.device), self._field("top_rest", pairs).to(self.device)

    def projected(self, pairs: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(self._field(name, pairs).to(self.device) for name in ("ids", "logp", "rest"))

    def spans(self, keep: Tensor, chunk_size: int) -> Tensor:
        return torch.where(keep, self._field("span", torch.arange(len(keep))), 0.0).to(self.device)


@dataclass
class CrossTokenizerSignal:
    """The KD term of a student taught by a teacher with another tokenizer, live or from ``CrossTokenizerCache``."""

    method: str  # uld | align
    view: TeacherView
    temperature: float
    teacher: nn.Module | None = None
    cache: CrossTokenizerCache | None = None

    def kd(self, s: StudentTokens) -> Tensor:
        rows = to_numpy(s.rows).astype(np.int64).reshape(-1)
        positions = s.hidden.shape[1]
        al = batch_alignment(self.view, rows, positions)
        device = s.hidden.device
        if self.cache is not None:
            teacher = _CachedTeacher(self.cache, rows, al, device)
        else:
            teacher = _LiveTeacher(self.teacher, self.view, rows, al, self.temperature)
        mask = s.mask.reshape(-1).to(device)
        hidden = s.hidden.reshape(-1, s.hidden.shape[-1])
        options = {"vocab_size": s.vocab_size, "temperature": self.temperature}
        total = hidden.sum() * 0.0  # keeps the graph (and every process's backward) whole when nothing is distilled
        on = mask[al.pair_s.to(device)].cpu()
        if self.method == "align":
            on &= al.exact
        for pairs in torch.nonzero(on)[:, 0].split(s.chunk_size):
            if self.method == "uld":
                targets = teacher.uld(pairs, s.vocab_size)  # the top min(Vs, Vt) and the rest: exact ULD
            else:
                targets = teacher.projected(pairs, None)
            targets = tuple(t.to(device) for t in targets)
            at = al.pair_s[pairs].to(device)
            total = total + pair_loss(hidden[at], s.weight, s.bias, targets, method=self.method, **options)
        if self.method == "align":
            total = total + self._spans(s, al, teacher, mask, hidden, options)
        return total / max(s.size, 1.0)

    def _spans(self, s: StudentTokens, al: BatchAlignment, teacher, mask, hidden, options) -> Tensor:
        """Σ span_kl over the spans whose every student token is trained."""
        device = hidden.device
        span_s, span_id = al.span_s.to(device), al.span_s_id.to(device)
        untrained = torch.zeros(al.spans, device=device).index_add(0, span_id, (~mask[span_s]).float())
        keep = (untrained == 0) & ~al.exact.to(device)
        on = keep[span_id]
        span_s, span_id = span_s[on], span_id[on]
        following = s.ids[:, 1:].reshape(-1).to(device)
        logp = [
            token_log_probs(hidden[chunk], s.weight, s.bias, following[chunk], **options)
            for chunk in span_s.split(s.chunk_size)
        ]
        if not logp:
            return hidden.new_zeros(())
        student = merge_spans(torch.cat(logp), span_id, al.spans)
        return span_kl(student[keep], teacher.spans(keep.cpu(), s.chunk_size).to(device)[keep]).sum()

    def kd_with_ce(self, s: StudentTokens, next_tokens: Tensor, kd_weight: float, ce_weight: float):
        kd, ce = self.kd(s), chunked_cross_entropy(s.hidden, s.weight, next_tokens, **s.loss_kwargs())
        return kd_weight * kd + ce_weight * ce, kd.detach(), ce.detach()
