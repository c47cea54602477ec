"""On-policy distillation (GKD, Agarwal et al. 2024): the student writes completions for the prompts and the
teacher scores them token by token; a step is on-policy with probability ``lam``, else it trains on the fixed
(teacher-written) sequences. Either way the loss is the generalised JSD(beta) between the teacher's and the
student's next-token distributions on the response tokens. The teacher only scores: it never generates.

``OnPolicyBatches`` is a ``train.Batches`` source, so the loop, checkpoints and resume are the usual ones; a causal-LM
recipe turns it on with ``distill.onpolicy: {lam, beta, max_new_tokens, temperature}``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill.data.token_blocks import TokenData
from distill.devices import to_numpy
from distill.losses import IGNORE_INDEX
from distill.models.causal_lm import head_of, last_hidden, unwrap
from distill.teachers.lm_signals import LiveLMSignal, StudentTokens


def prompt_lengths(data: TokenData) -> np.ndarray:
    """Tokens before the first trained label of each row (encode_pairs masks the prompt with IGNORE_INDEX)."""
    trained = data.labels != IGNORE_INDEX
    return np.where(trained.any(1), trained.argmax(1), data.attention_mask.sum(1))


@torch.no_grad()
def sample_completions(
    model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, pad_id: int, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's completions of ``prompts`` (one batched, left-padded ``generate``), returned right-padded as
    (input ids, attention mask, labels): labels are the generated tokens up to and including the first eos."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], attention[row, width - len(prompt) :] = torch.tensor(prompt), 1
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=attention,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    model.train(was_training)
    rows = []
    for prompt, generated in zip(prompts, out[:, width:].tolist(), strict=True):
        if eos_id in generated:
            generated = generated[: generated.index(eos_id) + 1]
        rows.append((prompt, generated))
    length = max(len(p) + len(g) for p, g in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE_INDEX)
    for row, (prompt, generated) in enumerate(rows):  # right-padded: positions count from the prompt's start
        sequence = prompt + generated
        ids[row, : len(sequence)], attention[row, : len(sequence)] = torch.tensor(sequence), 1
        labels[row, len(prompt) : len(sequence)] = torch.tensor(generated, dtype=torch.long)
    return ids, attention, labels


@dataclass
class OnPolicyBatches:
    data: TokenData  # the fixed sequences (prompt masked); their prompts are what the student completes
    teacher: nn.Module
    vocab_size: int
    lam: float = 0.5
    beta: float = 0.5
    max_new_tokens: int = 64
    temperature: float = 1.0
    pad_id: int = 0
    eos_id: int = 1
    chunk_size: int = 512
    seed: int = 0

    def __post_init__(self):
        self.prompt_ends = prompt_lengths(self.data)
        self.scorer = LiveLMSignal(self.teacher, "jsd", 1.0, {"beta": self.beta})

    @property
    def weights(self) -> np.ndarray:
        return (self.data.labels[:, 1:] != IGNORE_INDEX).sum(axis=1)

    def on_policy(self, rows: torch.Tensor) -> bool:
        """Seeded by the rows, so a resumed run makes the same choices."""
        return random.Random(hash((self.seed, *rows[:4].tolist()))).random() < self.lam

    def loss(self, model: nn.Module, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        index = to_numpy(rows)
        on_policy = self.on_policy(rows)
        if on_policy:
            prompts = [self.data.input_ids[i, : self.prompt_ends[i]].tolist() for i in index]
            ids, attention, labels = sample_completions(
                unwrap(model),
                prompts,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                pad_id=self.pad_id,
                eos_id=self.eos_id,
            )
        else:
            ids = torch.from_numpy(self.data.input_ids[index]).long()
            attention = torch.from_numpy(self.data.attention_mask[index]).long()
            labels = torch.from_numpy(self.data.labels[index])
        ids, attention = ids.to(device), attention.to(device)
        mask = (labels[:, 1:] != IGNORE_INDEX).to(device)
        hidden = last_hidden(model, ids, attention)[:, :-1]
        weight, bias = head_of(model)
        # Divided by the rows' weight (their trained tokens in the data), not by how many tokens the student wrote:
        # that count is only known per micro-batch, and dividing by it would make the gradient depend on the split.
        size = float(self.weights[index].sum())
        tokens = StudentTokens(hidden, weight, bias, rows, ids, attention, mask, self.chunk_size, self.vocab_size, size)
        loss = self.scorer.kd(tokens)
        return {"loss": loss, "jsd": loss.detach(), "on_policy": torch.tensor(float(on_policy))}
