"""A frozen sentence encoder's outputs as teacher signals, computed once and cached: pooled sentence vectors
(what probes and embedding students learn from) and every token's last-layer state."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from distill.devices import to_numpy
from distill.io import atomic_path, folder_lock
from distill.models.encoders import SentenceEncoder, batches_by_length, encode, pad_id_of, rows_digest, tokenize
from distill.teachers.logits_cache import build_logits_cache


def cached_outputs(model: nn.Module, rows: list[list[int]], pad_id: int, cache_dir: Path, model_id: str) -> np.ndarray:
    """``model``'s output for every row, computed once and kept in ``cache_dir`` under the model and the ids."""
    digest = rows_digest(rows)

    def run_rows(indices: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(encode(model, [rows[i] for i in indices.tolist()], pad_id))

    cache = build_logits_cache(
        cache_dir / f"outputs-{model_id}-{digest}",
        run_rows,
        np.arange(len(rows)).reshape(-1, 1),
        teacher_id=model_id,
        data_id=digest,
        batch_size=256,  # the progress bar's step
    )
    return np.array(cache.logits)  # a writable copy in memory


def teacher_features(
    encoder: SentenceEncoder, tokenizer, texts: list[str], max_length: int, cache_dir: Path, teacher_id: str
):
    """Pooled, unnormalised teacher outputs for ``texts`` (what the probe head reads; embedding tasks normalise them),
    cached by teacher weights and token ids (shared by every text task)."""
    rows = tokenize(tokenizer, texts, max_length)
    pooled = SentenceEncoder(encoder.transformer, encoder.pooling, normalize=False)
    return cached_outputs(pooled, rows, pad_id_of(tokenizer), cache_dir, teacher_id)


@dataclass
class TokenStates:
    """Every row's token states end to end (float16, one row of ``states`` per token) and where each row starts."""

    states: torch.Tensor
    offsets: torch.Tensor

    def batch(self, indices: torch.Tensor, width: int) -> torch.Tensor:
        """The rows at ``indices``, right-padded with zeros to ``width`` tokens: (batch, width, dim) float32."""
        out = torch.zeros((len(indices), width, self.states.shape[1]))
        for i, row in enumerate(indices.tolist()):
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            out[i, : end - start] = self.states[start:end].float()
        return out


@torch.inference_mode()
def token_states(encoder: SentenceEncoder, rows: list[list[int]], pad_id: int, batch_size: int = 64) -> TokenStates:
    """``encoder``'s last-layer state of every token of every row, run in batches of similar length."""
    offsets = torch.from_numpy(np.cumsum([0] + [len(r) for r in rows]))
    states = torch.empty((int(offsets[-1]), encoder.dim), dtype=torch.float16)
    encoder.eval()
    with Progress(
        TextColumn("[bold]teacher token states"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task("tokens", total=len(rows))
        for chosen, ids, attention in batches_by_length(rows, pad_id, batch_size):
            hidden = encoder.hidden(ids, attention)
            for j, row in enumerate(chosen):
                states[int(offsets[row]) : int(offsets[row + 1])] = hidden[j, : len(rows[row])]
            bar.update(task, advance=len(chosen))
    return TokenStates(states, offsets)


def cached_token_states(encoder, rows, pad_id: int, cache_dir: Path, teacher_id: str) -> TokenStates:
    """``token_states`` computed once and kept in ``cache_dir`` under the teacher and the token ids."""
    path = Path(cache_dir) / f"tokens-{teacher_id}-{rows_digest(rows)}.safetensors"
    with folder_lock(path, "token-state cache"):  # a second run computing the same states waits and reads them
        return _token_states_at(path, encoder, rows, pad_id)


def _token_states_at(path: Path, encoder, rows, pad_id: int) -> TokenStates:
    if path.is_file():
        cached = _read_token_states(path, len(rows))
        if cached is not None:
            return cached
        warnings.warn(f"token-state cache {path} is corrupt or from an older version; recomputing it", stacklevel=2)
    computed = token_states(encoder, rows, pad_id)
    with atomic_path(path) as tmp:
        tensors = {"states": computed.states, "offsets": computed.offsets}
        save_file(tensors, str(tmp), metadata={"sha256": _digest(tensors)})
    return computed


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(to_numpy(tensors[name].contiguous()).tobytes())
    return digest.hexdigest()


def _read_token_states(path: Path, n_rows: int) -> TokenStates | None:
    """The cached states when the file reads back whole (its SHA-256 matches) and fits the rows; else None."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get("sha256")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception:  # safetensors raises its own error types for a cut or garbled file
        return None
    if recorded != _digest(tensors) or set(tensors) != {"states", "offsets"}:
        return None
    states = TokenStates(**tensors)
    fits = len(states.offsets) == n_rows + 1 and int(states.offsets[-1]) == states.states.shape[0]
    return states if fits else None
