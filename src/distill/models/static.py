"""Static embeddings distilled from a sentence encoder (Model2Vec-style): one vector per vocabulary token.

Every token is run through the teacher once (``[CLS] token [SEP]``, the teacher's pooling), the vectors are
reduced by PCA and weighted by SIF, ``a / (a + p(token))`` with ``p`` counted on the training texts, so frequent
tokens count less. A sentence is the mean of its tokens' vectors: no transformer at inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.decomposition import PCA
from torch import nn

from distill.devices import to_numpy
from distill.errors import DistillError
from distill.io import atomic_dir
from distill.models.encoders import SentenceEncoder, load_tokenizer, pad


class StaticEncoder(nn.Module):
    """Token ids → mean of their vectors (special and padding tokens left out) → unit length if ``normalize``."""

    def __init__(self, vectors: torch.Tensor, keep: torch.Tensor, normalize: bool):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(vectors.float(), freeze=False)
        self.register_buffer("keep", keep.bool())
        self.normalize = normalize

    @property
    def dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = (attention_mask.bool() & self.keep[input_ids]).unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


@torch.inference_mode()
def token_vectors(encoder: SentenceEncoder, tokenizer, batch_size: int = 512) -> np.ndarray:
    """The teacher's pooled output for each vocabulary token on its own, wrapped in the special tokens."""
    encoder.eval()
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    rows = [[i for i in (first, token, last) if i is not None] for token in range(len(tokenizer))]
    pad_id = tokenizer.pad_token_id or 0
    parts = []
    for start in range(0, len(rows), batch_size):
        ids, attention = pad(rows[start : start + batch_size], pad_id)
        parts.append(to_numpy(encoder.pool(ids, attention).float()))
    return np.concatenate(parts)


def sif_weights(token_rows: list[list[int]], vocab_size: int, a: float) -> np.ndarray:
    counts = np.bincount(np.concatenate([np.asarray(r, dtype=np.int64) for r in token_rows]), minlength=vocab_size)
    p = counts[:vocab_size] / max(1, counts.sum())
    return a / (a + p)


def build_static(
    encoder: SentenceEncoder, tokenizer, token_rows: list[list[int]], *, pca_dims: int | None, sif: float, seed: int
) -> StaticEncoder:
    """Distil ``encoder`` into a static table; ``token_rows`` (tokenized training texts) give the SIF counts."""
    vectors = token_vectors(encoder, tokenizer)
    if pca_dims is not None:
        if pca_dims > min(vectors.shape):
            raise DistillError(f"student.static.pca_dims = {pca_dims} exceeds the teacher's width {vectors.shape[1]}")
        vectors = PCA(n_components=pca_dims, random_state=seed).fit_transform(vectors)
    vectors = vectors * sif_weights(token_rows, len(vectors), sif)[:, None]
    keep = torch.ones(len(vectors), dtype=torch.bool)
    keep[list(set(tokenizer.all_special_ids))] = False
    return StaticEncoder(torch.from_numpy(vectors.astype(np.float32)), keep, encoder.normalize).eval()


def save_static(model: StaticEncoder, tokenizer, folder: Path) -> Path:
    with atomic_dir(folder) as tmp:
        save_file(
            {"embeddings": model.embedding.weight.detach().contiguous(), "keep": model.keep},
            str(tmp / "static.safetensors"),
        )
        (tmp / "static.json").write_text(json.dumps({"normalize": model.normalize, "dim": model.dim}))
        tokenizer.save_pretrained(tmp)
    return folder


def load_static(folder: Path) -> tuple[StaticEncoder, object]:
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / "static.safetensors"))
        config = json.loads((folder / "static.json").read_text())
    except (OSError, ValueError) as exc:
        raise DistillError(f"{folder} is not a static embedding folder ({exc})") from None
    return StaticEncoder(tensors["embeddings"], tensors["keep"], config["normalize"]).eval(), load_tokenizer(folder)
