"""Offline LM teacher cache: k sparse targets per token (see ``distill.losses.sparse``), sharded and memory-mapped.

Layout of a cache folder: ``shard-00000.npy`` … (one per ``shard_blocks`` blocks of ``seq_len`` tokens, a
structured array [blocks, seq_len] with fields ``ids`` [k] — uint16 when the vocabulary fits, else uint32 —
and, for top-k, ``logp`` [k] and ``tail`` in float16), and ``meta.json``, written last, so a cache with a
meta.json is complete. While building, ``progress.json`` holds the same parameters and the shards done so
far; every shard is written atomically, so an interrupted build resumes at the first missing shard. Draws
are seeded per block from (seed, block index), so a resumed build writes the same bytes as an uninterrupted
one, whatever the batch or shard size.

A sampled cache may hold several independent sets of k draws per token (``sets``; ``ids`` then has sets·k
entries): epoch e reads set e mod sets. One fixed set reused every epoch pulls the student towards that set's
empirical distribution (counts/k), not towards the teacher's; fresh draws each epoch keep every epoch's targets
an independent unbiased estimate, so over the epochs the student is fit to sets·k draws per token. The sets are
drawn one after another from the block's stream, so set 0 is what a one-set cache holds.

A teacher that cannot answer for some blocks (a served teacher that read a block's tokens differently, under
``on_mismatch: skip``) returns a ``TeacherAnswer`` naming them: they are written as uniform records, listed in the
meta's ``skipped_blocks``, and never handed out as targets (``LMCache.lookup`` masks them; ``targets`` refuses them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill.devices import to_numpy
from distill.errors import DistillError
from distill.io import atomic_path, folder_lock, sha256_file, write_json
from distill.losses.sparse import MODES, SparseTargets, sparse_targets_from_logits
from distill.teachers.store import check_file, check_made_for, read_meta

FORMAT = "distill.lm_sparse/1"
FIX = "rebuild it with `distill cache RECIPE`"


@dataclass
class TeacherAnswer:
    """What a teacher function may return instead of bare logits [B, S, V]: also the rows it has no answer for
    (``skipped``, indices into the batch; their logits are ignored), counts summed over the cache (``counts``: say,
    alternatives a served teacher gave that could not be mapped to one of our tokens) and facts about how it was
    asked (``notes``); all three are kept in meta.json."""

    logits: torch.Tensor
    skipped: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def record_dtype(mode: str, k: int, vocab_size: int, sets: int = 1) -> np.dtype:
    """What one token costs on disk: k ids per set, plus k float16 log-probs and a float16 log-tail for top-k."""
    fields = [("ids", ids_dtype(vocab_size), (k * sets,))]
    if mode == "topk":
        fields += [("logp", np.float16, (k,)), ("tail", np.float16)]
    return np.dtype(fields)


def block_generator(seed: int, block: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that draws block ``block``'s samples. (seed, block) is hashed rather than added so that
    neighbouring seeds do not share streams; 32 bits because torch's CPU generator keeps only those."""
    state = int(np.random.SeedSequence([seed, block]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(state)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn state file counts as none: those shards are recomputed
    return data if isinstance(data, dict) else None


def _intact(path: Path, entry: dict) -> bool:
    # Shards are renamed into place whole, so a size check catches the only damage a build can leave.
    return path.is_file() and path.stat().st_size == entry.get("bytes")


def _write_shard(path, teacher_logits_fn, input_ids, lo, hi, record, params, batch_size) -> dict:
    mode, k, vocab_size = params["mode"], params["k"], params["vocab_size"]
    shard = np.empty((hi - lo, params["seq_len"]), dtype=record)
    skipped, counts, notes = [], {}, {}
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        answer = teacher_logits_fn(torch.from_numpy(input_ids[start:stop].astype(np.int64)))
        answer = answer if isinstance(answer, TeacherAnswer) else TeacherAnswer(answer)
        logits = answer.logits
        skipped += [start + int(row) for row in answer.skipped]
        counts = {key: counts.get(key, 0) + answer.counts.get(key, 0) for key in counts | answer.counts}
        notes = answer.notes | notes  # the first said stays (the first block skipped)
        if logits.ndim != 3 or logits.shape[:2] != (stop - start, params["seq_len"]) or logits.shape[2] < vocab_size:
            raise DistillError(
                f"teacher returned logits of shape {tuple(logits.shape)} for {stop - start} blocks of "
                f"{params['seq_len']} tokens; expected [{stop - start}, {params['seq_len']}, >= {vocab_size}]"
            )
        for b in range(stop - start):
            gen = block_generator(params["seed"], start + b, logits.device) if mode == "sampled" else None
            drawn = [  # one after another from the block's stream: set 0 is what a one-set cache draws
                sparse_targets_from_logits(
                    logits[b], mode=mode, k=k, temperature=params["temperature"], generator=gen, vocab_size=vocab_size
                )
                for _ in range(params.get("sets", 1))
            ]
            t = drawn[0]
            row = start - lo + b
            shard["ids"][row] = to_numpy(torch.cat([each.ids for each in drawn], -1))
            if mode == "topk":
                shard["logp"][row] = to_numpy(t.logp)
                shard["tail"][row] = to_numpy(t.tail)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:  # np.save(path) would append ".npy" to the name
        np.save(handle, shard)
    entry = {"file": path.name, "blocks": hi - lo, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return entry | {key: value for key, value in (("skipped", skipped), ("counts", counts), ("notes", notes)) if value}


def _answers(entries: list[dict]) -> dict:
    """What the shards' teacher answers add to meta.json: the skipped blocks, the counts summed, the notes (none of
    them for a teacher that answered every block with bare logits, whose meta stays as it always was)."""
    skipped = sorted(b for e in entries for b in e.get("skipped", []))
    counts = {}
    for e in entries:
        for key, n in e.get("counts", {}).items():
            counts[key] = counts.get(key, 0) + n
    notes = {key: value for e in reversed(entries) for key, value in e.get("notes", {}).items()}  # first wins
    pairs = (("skipped_blocks", skipped), ("teacher_counts", counts), ("teacher_notes", notes))
    return {key: value for key, value in pairs if value}


def build_lm_cache(
    teacher_logits_fn: Callable[[torch.Tensor], torch.Tensor | TeacherAnswer],
    input_ids: np.ndarray,
    out_dir: Path,
    *,
    mode: str = "sampled",
    k: int = 16,
    temperature: float = 1.0,
    teacher_id: str,
    data_id: str,
    vocab_size: int,
    batch_size: int = 8,
    shard_blocks: int = 256,
    seed: int = 0,
    sets: int = 1,
    progress: bool = True,
) -> Path:
    """Run the teacher over ``input_ids`` [N, S] once and store k sparse targets per token in ``out_dir``.

    ``teacher_logits_fn(LongTensor [B, S]) -> [B, S, V]`` (or a ``TeacherAnswer`` holding them) is called
    ``batch_size`` blocks at a time (run it under inference_mode). Rerunning with the same parameters resumes an
    interrupted build; a finished cache is left as it is. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
        raise DistillError(
            f"input_ids must be an integer array [blocks, seq_len], got {input_ids.dtype}{input_ids.shape}"
        )
    if mode not in MODES:
        raise DistillError(f"unknown LM cache mode {mode!r}; choose one of {list(MODES)}")
    if k < 1 or (mode == "topk" and k > vocab_size) or batch_size < 1 or shard_blocks < 1 or temperature <= 0:
        raise DistillError(
            f"bad LM cache settings k={k}, batch_size={batch_size}, shard_blocks={shard_blocks}, "
            f"temperature={temperature}: all must be positive (and k <= vocab_size {vocab_size} for topk)"
        )
    if sets < 1 or (mode == "topk" and sets > 1):
        raise DistillError(f"bad LM cache sets={sets}: at least 1, and 1 for topk (its targets are not drawn)")
    record = record_dtype(mode, k, vocab_size, sets)
    n_blocks, seq_len = (int(n) for n in input_ids.shape)
    params = {
        "format": FORMAT,
        "teacher_id": teacher_id,
        "data_id": data_id,
        "mode": mode,
        "k": k,
        "temperature": float(temperature),
        "vocab_size": vocab_size,
        "n_blocks": n_blocks,
        "seq_len": seq_len,
        "shard_blocks": shard_blocks,
        "seed": seed,
        "dtypes": {name: str(record.fields[name][0].base) for name in record.names},
        "bytes_per_token": record.itemsize,
    } | ({"sets": sets} if sets > 1 else {})  # one-set caches keep the meta they always had
    with folder_lock(out_dir, "LM teacher cache"):  # one build at a time: a second one waits, then resumes it
        return _fill(out_dir, params, record, teacher_logits_fn, input_ids, batch_size, progress)


def _fill(out_dir: Path, params: dict, record: np.dtype, teacher_logits_fn, input_ids, batch_size: int, progress: bool):
    """Write the shards not yet done (a resumed build keeps the intact ones), then meta.json, last."""
    n_blocks, seq_len, shard_blocks = params["n_blocks"], params["seq_len"], params["shard_blocks"]
    meta_path, progress_path = out_dir / "meta.json", out_dir / "progress.json"
    state = _read_json(meta_path) or _read_json(progress_path)
    if state is not None:
        changed = [key for key in params if state.get(key) != params[key]]
        if changed:
            key = changed[0]
            raise DistillError(
                f"{out_dir} holds an LM cache built with {key}={state.get(key)!r}, but this build has "
                f"{params[key]!r}; delete the folder or choose another cache_dir"
            )
    done = {e["file"]: e for e in (state or {}).get("shards", []) if _intact(out_dir / e["file"], e)}
    n_shards = math.ceil(n_blocks / shard_blocks)
    names = [f"shard-{s:05d}.npy" for s in range(n_shards)]
    if not (meta_path.is_file() and all(name in done for name in names)):
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp-*"):  # left by a killed build (atomic_path cleans up otherwise)
            stale.unlink()
        write_json(progress_path, {**params, "shards": list(done.values())})
        meta_path.unlink(missing_ok=True)  # from here until the end the cache is incomplete
        for s, name in enumerate(names):
            if name in done:
                continue
            lo, hi = s * shard_blocks, min((s + 1) * shard_blocks, n_blocks)
            done[name] = _write_shard(out_dir / name, teacher_logits_fn, input_ids, lo, hi, record, params, batch_size)
            write_json(progress_path, {**params, "shards": list(done.values())})
            if progress:
                print(f"LM cache {out_dir}: shard {s + 1}/{n_shards} ({hi}/{n_blocks} blocks)", flush=True)
        answers = _answers([done[name] for name in names])
        write_json(meta_path, {**params, "shards": [done[name] for name in names], **answers})
        progress_path.unlink(missing_ok=True)
        if answers.get("skipped_blocks"):  # said once, when the cache is finished
            skipped = answers["skipped_blocks"]
            first = answers.get("teacher_notes", {}).get("first_skipped", "")
            print(
                f"LM cache {out_dir}: {len(skipped)} of {n_blocks} blocks skipped, the teacher gave no targets for "
                f"them (meta.json skipped_blocks; they are not distilled){f'; first: {first}' if first else ''}",
                flush=True,
            )
        if answers.get("teacher_counts"):
            counts = ", ".join(f"{key} {n}" for key, n in answers["teacher_counts"].items())
            print(f"LM cache {out_dir}: the teacher's answers: {counts} (meta.json teacher_counts)", flush=True)
    if progress:
        total = sum(done[name]["bytes"] for name in names)
        print(
            f"LM cache {out_dir}: {n_blocks * seq_len} tokens, {record.itemsize} bytes/token "
            f"({total / 1e6:.1f} MB with headers)",
            flush=True,
        )
    return out_dir


class LMCache:
    """A finished LM cache, memory-mapped; ``cache[block_indices]`` gives ``SparseTargets`` [B, S, k]."""

    def __init__(self, path: Path, meta: dict, shards: list[np.ndarray]):
        self.path, self.meta, self.shards = path, meta, shards
        self.skipped = np.zeros(meta["n_blocks"], dtype=bool)  # blocks the teacher gave no targets for
        self.skipped[meta.get("skipped_blocks", [])] = True

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        teacher_id: str,
        data_id: str,
        temperature: float | None = None,
        mode: str | None = None,
        verify: bool = False,
    ) -> LMCache:
        """Open and validate a cache of ``teacher_id`` over ``data_id``; ``verify`` also checks each sha256."""
        path = Path(path)
        meta_path = path / "meta.json"
        meta = read_meta(path, "LM teacher cache", FIX)
        try:
            if meta["format"] != FORMAT:
                raise ValueError
            record = record_dtype(meta["mode"], meta["k"], meta["vocab_size"], meta.get("sets", 1))
            seq_len, shard_blocks, entries = meta["seq_len"], meta["shard_blocks"], meta["shards"]
            files = [(path / e["file"], e["blocks"], e["bytes"], e.get("sha256")) for e in entries]
            if sum(f[1] for f in files) != meta["n_blocks"]:
                raise ValueError
            skipped = meta.get("skipped_blocks", [])
            if not all(type(b) is int and 0 <= b < meta["n_blocks"] for b in skipped):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise DistillError(f"LM teacher cache {meta_path} is corrupt; {FIX}") from None
        wanted = {"teacher_id": teacher_id, "data_id": data_id, "temperature": temperature, "mode": mode}
        check_made_for(meta, wanted, path, "LM teacher cache", f"{FIX}, or point the recipe at a cache made with it")
        shards = []
        for i, (file, blocks, size, sha256) in enumerate(files):
            check_file(file, "LM teacher cache shard", f"{FIX} (it redoes only that shard)", size=size,
                       sha256=sha256 if verify else None)  # fmt: skip
            try:
                shard = np.load(file, mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise DistillError(
                    f"LM teacher cache shard {file} is unreadable ({exc}); delete it and {FIX}"
                ) from None
            full = i < len(files) - 1
            if shard.dtype != record or shard.shape != (blocks, seq_len) or (full and blocks != shard_blocks):
                raise DistillError(f"LM teacher cache shard {file} does not match meta.json; delete it and {FIX}")
            shards.append(shard)
        return cls(path, meta, shards)

    def __len__(self) -> int:
        return self.meta["n_blocks"]

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def temperature(self) -> float:
        return self.meta["temperature"]

    @property
    def bytes_per_token(self) -> int:
        return self.meta["bytes_per_token"]

    @property
    def sets(self) -> int:
        return self.meta.get("sets", 1)

    def __getitem__(self, block_indices) -> SparseTargets:
        """Targets of the blocks at ``block_indices`` (a LongTensor, any shape): [*shape, seq_len, k] (set 0)."""
        return self.targets(block_indices, epoch=0)

    def targets(self, block_indices, epoch: int) -> SparseTargets:
        """Targets of the blocks at ``block_indices`` for ``epoch``: its set of draws (epoch mod sets). A skipped
        block has none: asking for one is an error (``lookup`` reads past it)."""
        idx = self._indices(block_indices)
        if self.skipped[idx].any():
            block = int(idx.reshape(-1)[self.skipped[idx].reshape(-1)][0])
            raise DistillError(
                f"LM teacher cache {self.path}: block {block} has no teacher targets (skipped when the cache was "
                "built: the teacher read its tokens differently); read the cache with LMCache.lookup, which leaves "
                "skipped blocks out of the distillation"
            )
        return self._read(idx, epoch)

    def lookup(self, block_indices, epoch: int) -> tuple[SparseTargets, torch.Tensor | None]:
        """``SparseSignal``'s lookup: the blocks' targets for ``epoch`` and which positions have any ([*shape,
        seq_len] bool, False throughout a skipped block; None when the cache skipped none)."""
        idx = self._indices(block_indices)
        scored = None
        if self.skipped.any():
            scored = torch.from_numpy(~self.skipped[idx])[..., None].expand(*idx.shape, self.meta["seq_len"])
        return self._read(idx, epoch), scored

    def _indices(self, block_indices) -> np.ndarray:
        idx = to_numpy(torch.as_tensor(block_indices)).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"block index out of range 0..{len(self) - 1}")
        return idx

    def _read(self, idx: np.ndarray, epoch: int) -> SparseTargets:
        flat = idx.reshape(-1)
        out = np.empty((flat.size, self.meta["seq_len"]), dtype=self.shards[0].dtype)
        which = flat // self.meta["shard_blocks"]
        for s in np.unique(which):
            rows = np.nonzero(which == s)[0]
            out[rows] = self.shards[s][flat[rows] - s * self.meta["shard_blocks"]]
        shape = (*idx.shape, self.meta["seq_len"])
        ids = torch.from_numpy(out["ids"].astype(np.int64)).reshape(*shape, -1)
        if self.mode == "sampled":
            k, which = self.meta["k"], epoch % self.sets
            return SparseTargets(ids[..., which * k : (which + 1) * k])
        logp = torch.from_numpy(out["logp"].astype(np.float32)).reshape(*shape, -1)
        return SparseTargets(ids, logp, torch.from_numpy(out["tail"].astype(np.float32)).reshape(shape))


def lm_cache_dir(root: Path, teacher_id: str, data_id: str, d, sets: int = 1) -> Path:
    """The cache folder of a teacher, training blocks and cache settings (``d``: the recipe's distill section;
    ``sets`` as ``ensure_lm_cache`` gets it)."""
    sets = f"x{sets}" if sets > 1 else ""
    return root / f"teacher-{teacher_id}-data-{data_id}-{d.cache_mode}{d.cache_k}{sets}-T{d.temperature:g}"


def ensure_lm_cache(
    path: Path,
    teacher,
    train_ids: np.ndarray,
    d,
    *,
    teacher_id: str,
    data_id: str,
    vocab_size: int,
    seed: int,
    device,
    sets: int = 1,
    served: Callable[[torch.Tensor], TeacherAnswer] | None = None,
    batch_size: int = 8,
) -> LMCache:
    """Open the teacher cache at ``path``, building (or finishing) it first if needed: from ``teacher`` run here, or
    from ``served`` (a served teacher's answers as log-probabilities, ``served_cache.served_teacher_logits``; the
    blocks it skipped are listed in the meta and left out by ``LMCache.lookup``)."""
    if d.loss != "forward_kl":
        raise DistillError(
            f"distill.loss {d.loss}: the LM teacher cache estimates forward_kl only; "
            "use distill.signal: live for other divergences"
        )
    built_before = (path / "meta.json").exists()
    if not built_before:

        @torch.no_grad()
        def teacher_logits(input_ids: torch.Tensor) -> torch.Tensor:
            return teacher.to(device)(input_ids=input_ids.to(device)).logits.float()

        build_lm_cache(
            served or teacher_logits,
            train_ids,
            path,
            mode=d.cache_mode,
            k=d.cache_k,
            temperature=d.temperature,
            teacher_id=teacher_id,
            data_id=data_id,
            vocab_size=vocab_size,
            seed=seed,
            shard_blocks=d.cache_shard_blocks,
            sets=sets,
            batch_size=batch_size,
        )
    # A cache made by an earlier run is checked shard by shard against its SHA-256 (a same-size corruption passes the
    # size check); one this call just wrote was hashed as it was written.
    return LMCache.open(path, teacher_id=teacher_id, data_id=data_id, temperature=d.temperature, verify=built_before)
