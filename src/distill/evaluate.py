"""Measurements for every model in a comparison: quality, agreement with the teacher, size, speed."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError
from distill.losses import IGNORE_INDEX
from distill.losses.divergences import PER_POSITION, forward_kl
from distill.losses.embedding import embedding_losses
from distill.models import count_parameters
from distill.models.encoders import pad, pad_id_of, tokenize


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    model.eval()
    # An int8 MLP has no float parameters left: it runs on the CPU.
    device = next(model.parameters(), torch.empty(0)).device
    parts = [
        model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu() for i in range(0, len(x), batch_size)
    ]
    return torch.cat(parts)


@torch.inference_mode()
def cpu_latency(model: nn.Module, x: np.ndarray, *, threads: int, runs: int, large_batch: int = 1024) -> dict:
    """Median batch-1 latency and large-batch throughput on the CPU with ``threads`` threads, after warm-up."""
    model = model.eval().to("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one = torch.from_numpy(x[:1])
        many = torch.from_numpy(np.resize(x, (large_batch, *x.shape[1:])))
        for _ in range(20):
            model(one)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(one)
            times.append(time.perf_counter() - start)
        model(many)
        batch_times = []
        for _ in range(max(3, runs // 20)):
            start = time.perf_counter()
            model(many)
            batch_times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {
        "latency_ms_batch1": round(statistics.median(times) * 1e3, 4),
        f"throughput_per_s_batch{large_batch}": round(large_batch / statistics.median(batch_times), 1),
        "threads": threads,
    }


def classifier_metrics(
    model: nn.Module,
    weights: Path,
    logits: torch.Tensor,
    test_x: np.ndarray,
    test_y: np.ndarray,
    teacher_logits: torch.Tensor | None,
    *,
    threads: int,
    runs: int,
) -> dict:
    """Size, scores of ``logits`` (the model's on ``test_x``) and CPU speed of one classifier."""
    metrics = {"parameters": count_parameters(model), "file_bytes": weights.stat().st_size}
    metrics |= classifier_scores(logits, torch.from_numpy(np.asarray(test_y)), teacher_logits)
    return metrics | cpu_latency(model, test_x, threads=threads, runs=runs)


def teacher_scores(logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement with the teacher and forward KL to it, rounded as every report shows them."""
    agreement = (logits.argmax(-1) == teacher_logits.argmax(-1)).double().mean().item()
    return round(agreement, 6), round(float(forward_kl(logits, teacher_logits)), 6)


def classifier_scores(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None) -> dict:
    """Accuracy and errors on the test labels; agreement and KL with the teacher when its logits are given."""
    errors = int((logits.argmax(-1) != labels).sum())
    scores = {
        "test_accuracy": round(1 - errors / len(labels), 6),
        "test_errors": errors,
        "test_examples": len(labels),
    }
    if teacher_logits is not None:
        scores["agreement_with_teacher"], scores["kl_to_teacher"] = teacher_scores(logits, teacher_logits)
    return scores


def validation_scores(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None) -> dict:
    """What a classifier stage is validated on: loss and accuracy on the labels, and, when the teacher's logits
    are given, agreement with it and forward KL to it (``train.select_by`` picks one)."""
    scores = {
        "loss": round(F.cross_entropy(logits, labels).item(), 6),
        "accuracy": round((logits.argmax(-1) == labels).double().mean().item(), 6),
    }
    if teacher_logits is not None:
        scores["agreement"], scores["kl"] = teacher_scores(logits, teacher_logits)
    return scores


def paired_loss_lead(teacher_logits: torch.Tensor, baseline_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """How much lower the teacher's cross-entropy is than the baseline's on the same labeled examples (mean of the
    per-example differences, float64), the standard error of that mean, and both accuracies."""
    teacher = F.cross_entropy(teacher_logits.double(), labels, reduction="none")
    baseline = F.cross_entropy(baseline_logits.double(), labels, reduction="none")
    lead = baseline - teacher
    n = len(labels)
    return {
        "examples": n,
        "loss_lead": round(lead.mean().item(), 6),
        "standard_error": round(lead.std().item() / n**0.5 if n > 1 else float("inf"), 6),
        "teacher_accuracy": round((teacher_logits.argmax(-1) == labels).double().mean().item(), 6),
        "baseline_accuracy": round((baseline_logits.argmax(-1) == labels).double().mean().item(), 6),
    }


def embedding_validation_scores(predicted: torch.Tensor, targets: torch.Tensor, loss: str) -> dict:
    """What an embedding student is validated on: the sentence loss it trains on (``loss``: mse, cosine or
    mse+cosine) against the teacher's embeddings, and its mean cosine to them."""
    terms = embedding_losses(predicted, targets, loss)
    return {"loss": round(terms["loss"].item(), 6), "cosine": round(1.0 - terms["cosine"].item(), 6)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters as stored (tied weights once): a safetensors file's size, less header."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


@torch.inference_mode()
def lm_forward_seconds(model: nn.Module, input_ids: torch.Tensor, *, threads: int, runs: int = 3) -> float:
    """Median time of one CPU forward pass over ``input_ids`` with ``threads`` threads, after a warm-up."""
    model = model.eval().to("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model(input_ids=input_ids)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(input_ids=input_ids)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


def lm_tokens_per_second(model: nn.Module, input_ids: torch.Tensor, *, threads: int) -> float:
    """Forward (scoring) throughput on the CPU."""
    return input_ids.numel() / lm_forward_seconds(model, input_ids, threads=threads)


def _target_log_probs(model: nn.Module, ids, attention, mask, vocab_size: int) -> torch.Tensor:
    """Log-probabilities [n, vocab_size] at the positions whose next token is a target."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1, :vocab_size]
    return torch.log_softmax(logits[mask].float(), dim=-1)


def prompt_of(heldout, row: int) -> tuple[np.ndarray, np.ndarray]:
    """A held-out row cut into a prompt and what follows it: a prompt/response row at its response, a text block at
    its middle."""
    ids = heldout.input_ids[row][heldout.attention_mask[row] > 0].astype(np.int64)
    trained = np.flatnonzero(heldout.labels[row][: len(ids)] != IGNORE_INDEX)
    cut = int(trained[0]) if len(trained) and trained[0] > 0 else max(1, len(ids) // 2)
    return ids[:cut], ids[cut:]


@torch.inference_mode()
def side_by_side(models: dict[str, nn.Module], heldout, tokenizer, *, prompts: int, new_tokens: int, seed: int):
    """The first ``prompts`` held-out rows continued by every model, greedy and sampled (temperature 1, no top-k or
    top-p; the same seed for every model, so a difference is the model's), beside the text that really follows."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for row in range(min(prompts, len(heldout))):
        prompt, rest = prompt_of(heldout, row)
        ids = torch.from_numpy(prompt)[None]
        entry = {"prompt": tokenizer.decode(prompt), "reference": tokenizer.decode(rest[:new_tokens])}
        for name, model in models.items():
            entry[name] = {}
            for mode, sampling in (("greedy", {"do_sample": False}), ("sampled", SAMPLING)):
                torch.manual_seed(seed + row)
                out = model.eval().generate(
                    ids.to(model.device),
                    attention_mask=torch.ones_like(ids).to(model.device),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=pad,
                    **sampling,
                )
                entry[name][mode] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append(entry)
    return rows


SAMPLING = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def heldout_batches(heldout, batch_size: int):
    """(input ids, attention mask, target mask, target tokens) per batch: targets are the next tokens that count."""
    for start in range(0, len(heldout), batch_size):
        rows = slice(start, start + batch_size)
        next_tokens = torch.from_numpy(heldout.labels[rows][:, 1:])
        mask = next_tokens != IGNORE_INDEX
        ids = torch.from_numpy(heldout.input_ids[rows]).long()
        yield ids, torch.from_numpy(heldout.attention_mask[rows]).long(), mask, next_tokens[mask]


def _add_token_scores(sums: dict, logp: torch.Tensor, targets: torch.Tensor, teacher_logp: torch.Tensor | None):
    """Add a batch's summed next-token loss, top-1 hits, and top-1 agreement and KL with the teacher to ``sums``."""
    sums["loss"] += -logp.gather(-1, targets[:, None]).sum().item()
    sums["accuracy"] += (logp.argmax(-1) == targets).sum().item()
    if teacher_logp is not None:
        sums["agreement"] += (logp.argmax(-1) == teacher_logp.argmax(-1)).sum().item()
        sums["kl"] += PER_POSITION["forward_kl"](logp, teacher_logp).sum().item()


def _token_sums() -> dict:
    return {"loss": 0.0, "accuracy": 0, "agreement": 0, "kl": 0.0}


@torch.inference_mode()
def lm_perplexity(model: nn.Module, heldout, *, vocab_size: int, batch_size: int = 8) -> float:
    """Held-out perplexity of one model (``lm_metrics`` compares several against a teacher)."""
    sums, tokens = _token_sums(), 0
    for ids, attention, mask, targets in heldout_batches(heldout, batch_size):
        _add_token_scores(sums, _target_log_probs(model.eval(), ids, attention, mask, vocab_size), targets, None)
        tokens += len(targets)
    return math.exp(sums["loss"] / tokens)


TEACHER_MEMO_BYTES = 1 << 30  # the frozen teacher's validation log-probs kept (in host memory) between validations


@torch.inference_mode()
def lm_validation(
    model: nn.Module, teacher: nn.Module | None, blocks, *, vocab_size: int, batch_size: int, memo: dict | None = None
) -> dict:
    """What an LM stage is validated on, on its own device: next-token loss and top-1 accuracy, and with a
    teacher its top-1 agreement and KL per target token (the teacher runs on its device, batch by batch). ``memo``
    keeps the frozen teacher's log-probs per batch for the next validation (up to ``TEACHER_MEMO_BYTES``; the batches
    past it are recomputed each time)."""
    device = next(model.parameters()).device
    sums, tokens = _token_sums(), 0
    for i, (ids, attention, mask, targets) in enumerate(heldout_batches(blocks, batch_size)):
        logp = _target_log_probs(model, ids.to(device), attention.to(device), mask.to(device), vocab_size)
        teacher_logp = None
        if teacher is not None:
            teacher_logp = memo.get(i) if memo is not None else None
            if teacher_logp is None:
                on = next(teacher.parameters()).device
                teacher_logp = _target_log_probs(teacher, ids.to(on), attention.to(on), mask.to(on), vocab_size)
                held = sum(t.nbytes for t in memo.values()) if memo is not None else TEACHER_MEMO_BYTES
                if held + teacher_logp.nbytes <= TEACHER_MEMO_BYTES:
                    memo[i] = teacher_logp.cpu()  # host memory: a GPU run keeps its device memory for training
            teacher_logp = teacher_logp.to(device)
        _add_token_scores(sums, logp, targets.to(device), teacher_logp)
        tokens += len(targets)
    if tokens == 0:
        raise DistillError("the validation blocks have no target tokens; raise data.validation_fraction")
    keys = ("loss", "accuracy", "agreement", "kl") if teacher is not None else ("loss", "accuracy")
    return {key: round(sums[key] / tokens, 6) for key in keys}


@torch.inference_mode()
def lm_metrics(models: dict[str, nn.Module], heldout, *, vocab_size: int, batch_size: int, threads: int) -> dict:
    """Held-out perplexity, top-1 agreement with and KL from ``models["teacher"]``, size and tokens/s.

    Every model sees the same batches; the teacher's logits are computed once per batch. Positions are those
    whose next token is a training target (prompts and padding excluded); padded vocab rows are dropped.
    """
    teacher = models["teacher"]
    sums = {name: _token_sums() for name in models}
    tokens = 0
    for model in models.values():
        model.eval().to("cpu")
    for ids, attention, mask, targets in heldout_batches(heldout, batch_size):
        tokens += len(targets)
        teacher_logp = _target_log_probs(teacher, ids, attention, mask, vocab_size)
        for name, model in models.items():
            logp = teacher_logp if model is teacher else _target_log_probs(model, ids, attention, mask, vocab_size)
            _add_token_scores(sums[name], logp, targets, teacher_logp)
    if tokens == 0:
        raise DistillError("the held-out split has no target tokens; raise data.heldout_fraction")
    timing_ids = torch.from_numpy(heldout.input_ids[:batch_size]).long()
    results = {}
    for name, model in models.items():
        is_teacher = model is teacher
        results[name] = {
            "parameters": count_parameters(model),
            "file_bytes": weight_bytes(model),
            "heldout_tokens": tokens,
            "perplexity": math.exp(sums[name]["loss"] / tokens),
            "agreement_with_teacher": None if is_teacher else sums[name]["agreement"] / tokens,
            "kl_to_teacher": None if is_teacher else sums[name]["kl"] / tokens,
            "tokens_per_s": lm_tokens_per_second(model, timing_ids, threads=threads),
        }
    return results


def folder_bytes(folder: Path) -> int:
    """Bytes of a model folder's weights (its safetensors files)."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@torch.inference_mode()
def text_speed(model: nn.Module, tokenizer, texts: list[str], *, max_length: int, threads: int, batch_size: int):
    """Batch-1 latency and batched throughput, texts in → outputs, tokenization included, on the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    pad_id = pad_id_of(tokenizer)

    def run(batch: list[str]) -> None:
        ids, attention = pad(tokenize(tokenizer, batch, max_length), pad_id)
        model(ids, attention)

    try:
        model.eval()
        for text in texts[:5]:
            run([text])
        singles = []
        for text in texts[:64]:
            start = time.perf_counter()
            run([text])
            singles.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, len(texts), batch_size):
            run(texts[i : i + batch_size])
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    return {
        "latency_ms_batch1": round(statistics.median(singles) * 1e3, 3),
        "texts_per_s": round(len(texts) / seconds, 1),
        "threads": threads,
    }


def calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> dict:
    """Expected calibration error of the top-1 confidence (equal-width bins; the count-weighted mean of
    |accuracy − confidence| per bin) and the reliability diagram's points: [mean confidence, accuracy, examples] of
    every non-empty bin."""
    probs = torch.softmax(logits.double(), -1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    which = torch.clamp((confidence * bins).long(), max=bins - 1)  # confidence 1.0 falls in the last bin
    points, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        if n:
            conf, acc = confidence[inside].mean().item(), correct[inside].mean().item()
            ece += n / len(labels) * abs(acc - conf)
            points.append([round(conf, 4), round(acc, 4), n])
    return {"ece": round(ece, 6), "bins": points}


def disagreements(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor, *, top: int = 8
) -> dict:
    """Where the student's top-1 differs from the teacher's: how often, which (teacher, student) class pairs most
    often, and the ``top`` examples whose two distributions differ most (total variation), each with both models'
    three most likely classes."""
    teacher_p, student_p = torch.softmax(teacher_logits.double(), -1), torch.softmax(student_logits.double(), -1)
    t, s = teacher_p.argmax(-1), student_p.argmax(-1)
    differ = torch.nonzero(t != s).flatten()
    pairs: dict[tuple[int, int], int] = {}
    for i in differ.tolist():
        pairs[(int(t[i]), int(s[i]))] = pairs.get((int(t[i]), int(s[i])), 0) + 1
    distance = 0.5 * (teacher_p - student_p).abs().sum(-1)
    worst = differ[torch.argsort(distance[differ], descending=True)[:top]]

    def likely(p: torch.Tensor) -> list:
        values, classes = p.topk(min(3, len(p)))
        return [[int(c), round(v, 4)] for c, v in zip(classes.tolist(), values.tolist(), strict=True)]

    return {
        "count": len(differ),
        "of": len(labels),
        "pairs": [[a, b, n] for (a, b), n in sorted(pairs.items(), key=lambda item: -item[1])[:10]],
        "examples": [
            {
                "index": int(i),
                "label": int(labels[i]),
                "distance": round(distance[i].item(), 4),
                "teacher": likely(teacher_p[i]),
                "student": likely(student_p[i]),
            }
            for i in worst.tolist()
        ],
    }


@torch.inference_mode()
def token_kl_passage(student: nn.Module, teacher: nn.Module, heldout, tokenizer, *, vocab_size: int, row: int = 0):
    """One held-out passage token by token: each target token's text and the student's forward KL to the teacher
    at the position that predicts it (what the report colours)."""
    ids = torch.from_numpy(heldout.input_ids[row : row + 1]).long()
    attention = torch.from_numpy(heldout.attention_mask[row : row + 1]).long()
    mask = torch.from_numpy(heldout.labels[row : row + 1, 1:]) != IGNORE_INDEX
    student_logp = _target_log_probs(student.eval().to("cpu"), ids, attention, mask, vocab_size)
    teacher_logp = _target_log_probs(teacher.eval().to("cpu"), ids, attention, mask, vocab_size)
    kl = PER_POSITION["forward_kl"](student_logp, teacher_logp)
    targets = ids[:, 1:][mask]
    return {
        "context": tokenizer.decode(ids[0, : int(torch.nonzero(mask[0])[0]) + 1]) if mask.any() else "",
        "pieces": [tokenizer.decode([int(token)]) for token in targets],
        "kl": [round(float(value), 5) for value in kl],
    }


@torch.inference_mode()
def bits_per_char(model, tokenizer, chunks: list[str], batch_size: int = 8) -> float:
    """Σ −log₂ p(token) over every token of every chunk (each read after an eos) / the chunks' characters."""
    model = model.eval()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    bits = 0.0
    for start in range(0, len(chunks), batch_size):
        rows = [[eos, *tokenizer(c, add_special_tokens=False)["input_ids"]] for c in chunks[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), eos, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab].float()
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        bits -= (logp * mask[:, 1:]).sum().item() / math.log(2)
    return bits / sum(map(len, chunks))
