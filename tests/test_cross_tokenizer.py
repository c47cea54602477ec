"""Distillation across tokenizers (issue 21): the alignment on crafted strings, the losses against float64 references
written here, align = forward KL under one tokenizer, live = cache, one tokenizer padded to two table sizes, and the
bad inputs (one line each)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from lm_fixtures import TEXT, save_tiny, tiny_llama, tiny_qwen2, tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from distill.data.token_blocks import BlockTexts, pack_text
from distill.errors import DistillError
from distill.losses.cross_tokenizer import log1mexp, merge_spans, shared_kl, span_kl, uld_distance
from distill.models.causal_lm import check_vocab, head_of, last_hidden, load_causal_lm
from distill.tasks import load_recipe
from distill.tasks.causal_lm import LMBatches, setup, student_batches, with_student
from distill.tasks.causal_lm import run as run_lm
from distill.teachers.cross_tokenizer import (
    BYTE_DECODER,
    CrossTokenizerSignal,
    TeacherView,
    align_offsets,
    build_cross_cache,
    check_offsets,
    spellings,
    teacher_view,
    token_map,
)
from distill.teachers.lm_signals import LiveLMSignal, StudentTokens

CRAFTED = [
    "The student learns to copy héllo wörld 日本語 the teacher . ",
    "  two  spaces\n\nand lines\ttabs 🙂 emoji, the quick brown fox",
    "numbers like one two three ünïcödé and the lazy dog",
]


@pytest.fixture(scope="module")
def teacher_tok():
    return tiny_tokenizer(300)


@pytest.fixture(scope="module")
def student_tok():
    return other_tokenizer()


def other_tokenizer(vocab_size: int = 280, normalizer=None) -> PreTrainedTokenizerFast:
    """A second byte-level BPE, trained on other text: it splits many words differently from ``tiny_tokenizer``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if normalizer is not None:
        backend.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s_pad>", "<s_eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT[::-1], " ".join(CRAFTED), TEXT[100:300]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<s_pad>", eos_token="<s_eos>")


def token_bytes(tokenizer, ids) -> bytes:
    """What the tokens spell; eos spells the separator it stands for between documents."""
    pieces = [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    return b"".join(b"\x00" if p == tokenizer.eos_token else bytes(BYTE_DECODER[c] for c in p) for p in pieces)


# ---- the alignment ----


def test_alignment_of_hand_made_offsets():
    # "aé b": the student splits é over two byte tokens (both report é's span) and reads " b" as one token; the
    # teacher reads "aé", " ", "b". Shared boundaries after é (2) and at the end (4): one span, 1 vs 2 tokens.
    a = align_offsets([0, 1, 1, 2], [1, 2, 2, 4], [0, 2, 3], [2, 3, 4])
    assert a.pair_s.tolist() == [2] and a.pair_t.tolist() == [0] and a.exact.tolist() == [False]
    assert a.span_s.tolist() == [2] and a.span_t.tolist() == [0, 1]
    assert a.span_s_id.tolist() == [0] and a.span_t_id.tolist() == [0, 0]
    # A student that drops whitespace (WordPiece: "hi", "there") against one that keeps it ("hi", " ", " there").
    a = align_offsets([0, 4], [2, 9], [0, 2, 3], [2, 3, 9])
    assert a.pair_s.tolist() == [0] and a.exact.tolist() == [False] and a.span_t.tolist() == [0, 1]
    # The same tokens on both sides: every span coincides.
    a = align_offsets([0, 1, 3], [1, 3, 6], [0, 1, 3], [1, 3, 6])
    assert a.pair_s.tolist() == a.pair_t.tolist() == [0, 1] and a.exact.all() and a.span_s.size == 0
    # A last token that ends inside a character (the next block holds its other bytes) is no boundary.
    a = align_offsets([0, 1], [1, 2], [0, 1], [1, 2], s_after=1)
    assert a.pair_s.size == 0


def test_alignment_of_two_tokenizers_on_crafted_strings(teacher_tok, student_tok):
    """Multi-byte characters, runs of whitespace, tabs, an emoji, words split differently: every pair has read the
    same characters, coinciding tokens spell the same bytes, and each span spells the same text on both sides."""
    data = pack_text(CRAFTED, student_tok, 12, with_texts=True)
    view = teacher_view(data, teacher_tok, student_tok, teacher_vocab=len(teacher_tok), student_vocab=len(student_tok))
    exact = spans = 0
    for b, a in enumerate(view.alignments):
        s_ids, t_ids = data.input_ids[b], view.ids[b, : view.lengths[b]]
        s_ends, text = data.texts.ends[b], data.texts.texts[b]
        t_enc = teacher_tok(text.split("\x00"), add_special_tokens=False)["input_ids"]
        assert len(t_ids) == sum(map(len, t_enc)) + text.count("\x00")
        covered = sorted(set(a.pair_s.tolist()) | set(a.span_s.tolist()))  # no gaps; to the end unless it splits
        assert covered == list(range(covered[0], covered[-1] + 1))  # a character (its other bytes: the next block)
        assert covered[-1] == len(s_ids) - 2 or data.texts.following[b] < s_ends[-1]
        for k, (i, j) in enumerate(zip(a.pair_s, a.pair_t, strict=True)):
            if a.exact[k]:
                exact += 1
                assert token_bytes(student_tok, [s_ids[i + 1]]) == token_bytes(teacher_tok, [t_ids[j + 1]])
                continue
            spans += 1
            s_tokens = s_ids[a.span_s[a.span_s_id == k] + 1]
            t_tokens = t_ids[a.span_t[a.span_t_id == k] + 1]
            assert token_bytes(student_tok, s_tokens) == token_bytes(teacher_tok, t_tokens)
            ends = s_ends[a.span_s[a.span_s_id == k] + 1]
            assert ends.max() == s_ends[a.span_s[a.span_s_id == k].max() + 1]
    assert exact > 10 and spans > 10


def test_token_map_undoes_the_markers_and_maps_a_missing_token_to_its_longest_prefix(teacher_tok, student_tok):
    t_ids, s_ids = token_map(teacher_tok, student_tok, len(teacher_tok), len(student_tok))
    mapped = dict(zip(t_ids.tolist(), s_ids.tolist(), strict=True))
    s_vocab = {token_bytes(student_tok, [i]): i for i in range(len(student_tok)) if i > 1}
    for t in range(3, len(teacher_tok)):
        text = token_bytes(teacher_tok, [t])
        longest = next(text[:n] for n in range(len(text), 0, -1) if text[:n] in s_vocab)
        assert mapped[t] == s_vocab[longest]
    assert mapped[teacher_tok.eos_token_id] == student_tok.eos_token_id
    assert teacher_tok.pad_token_id not in mapped  # a special token without a namesake: the tail
    # SentencePiece's ▁ and a byte-fallback token, WordPiece's ## and word starts, all read as bytes.
    sp = Tokenizer(models.BPE(vocab={"▁the": 0, "<0xC3>": 1, "a": 2, "<eos>": 3}, merges=[]))
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    sp = PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="<eos>")
    wp = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "the": 1, "##a": 2, "<eos>": 3}, unk_token="[UNK]"))
    wp.decoder = decoders.WordPiece()
    wp = PreTrainedTokenizerFast(tokenizer_object=wp, eos_token="<eos>", unk_token="[UNK]")
    t_ids, s_ids = token_map(sp, teacher_tok, 4, len(teacher_tok))
    s_of = dict(zip(t_ids.tolist(), s_ids.tolist(), strict=True))
    assert token_bytes(teacher_tok, [s_of[0]]) == b" the"[: len(token_bytes(teacher_tok, [s_of[0]]))]
    assert token_bytes(teacher_tok, [s_of[1]]) == b"\xc3"
    t_ids, s_ids = token_map(wp, sp, 4, 4)
    assert dict(zip(t_ids.tolist(), s_ids.tolist(), strict=True)) == {1: 0, 2: 2, 3: 3}


# ---- the losses against float64 references ----


def test_losses_equal_float64_references():
    torch.manual_seed(0)
    n, vs, vt = 5, 7, 11
    log_s = torch.randn(n, vs, dtype=torch.float64).mul(2).log_softmax(-1)
    log_t = torch.randn(n, vt, dtype=torch.float64).mul(2).log_softmax(-1)
    p, q = log_s.exp().numpy(), log_t.exp().numpy()
    # ULD: sorted vectors, the shorter padded with zeros, L1; the teacher given whole or as its top 4 and the rest.
    ref = np.abs(np.sort(np.pad(p, ((0, 0), (0, vt - vs))))[:, ::-1] - np.sort(q)[:, ::-1]).sum(1)
    whole = uld_distance(log_s.float(), log_t.float(), torch.full((n,), -np.inf))
    np.testing.assert_allclose(whole.numpy(), ref, rtol=1e-5)
    top, _ = log_t.topk(vs)
    rest = torch.log(1 - top.exp().sum(-1))
    np.testing.assert_allclose(uld_distance(log_s, top, rest).numpy(), ref, rtol=1e-10)  # k = Vs: still exact
    top4, _ = log_t.topk(4)
    rest4 = torch.log(1 - top4.exp().sum(-1))
    ps = np.sort(p)[:, ::-1]
    ref4 = np.abs(ps[:, :4] - np.exp(top4.numpy())).sum(1) + np.abs(ps[:, 4:].sum(1) - np.exp(rest4.numpy()))
    np.testing.assert_allclose(uld_distance(log_s.float(), top4.float(), rest4.float()).numpy(), ref4, rtol=1e-5)
    # The KL over student tokens {0, 2, 3} with the teacher's log-probs on them, plus the rest bucket.
    ids = torch.tensor([0, 2, 3])
    tq = np.stack([q[:, 0] + q[:, 5], q[:, 1], q[:, 2]], 1)  # some teacher distribution over those three and a rest
    tr = 1 - tq.sum(1)
    sr = 1 - p[:, [0, 2, 3]].sum(1)
    ref = (tq * np.log(tq / p[:, [0, 2, 3]])).sum(1) + tr * np.log(tr / sr)
    got = shared_kl(log_s.float(), ids, torch.from_numpy(np.log(tq)).float(), torch.from_numpy(np.log(tr)).float())
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
    per_row = shared_kl(log_s, ids.expand(n, -1), torch.from_numpy(np.log(tq)), torch.from_numpy(np.log(tr)))
    np.testing.assert_allclose(per_row.numpy(), ref, rtol=1e-10)
    # Chain rule and the binary KL of spans.
    token_logp = torch.tensor([-0.5, -1.0, -0.25, -2.0], dtype=torch.float64)
    merged = merge_spans(token_logp, torch.tensor([0, 0, 1, 1]), 3)
    assert merged.tolist() == [-1.5, -2.25, 0.0]
    ps_, qs_ = np.exp([-1.5, -2.25]), np.exp([-0.3, -4.0])
    ref = qs_ * np.log(qs_ / ps_) + (1 - qs_) * np.log((1 - qs_) / (1 - ps_))
    got = span_kl(merged[:2].float(), torch.tensor([-0.3, -4.0]))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)
    assert span_kl(torch.tensor([-1.0]), torch.tensor([0.0])).item() == pytest.approx(1.0)  # teacher certain: −log p
    near_zero, far = np.log(-np.expm1([-1e-8, -0.5])), np.log1p(-np.exp([-30.0]))  # each form where it is accurate
    got = log1mexp(torch.tensor([-1e-8, -0.5, -30.0], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, np.concatenate([near_zero, far]), rtol=1e-12)


def student_tokens(model, data, rows, vocab, labels=None) -> StudentTokens:
    ids = torch.from_numpy(data.input_ids[rows]).long()
    attention = torch.ones_like(ids)
    hidden = last_hidden(model, ids, attention)[:, :-1]
    weight, bias = head_of(model)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool) if labels is None else labels
    return StudentTokens(hidden, weight, bias, torch.as_tensor(rows), ids, attention, mask, 8, vocab, float(mask.sum()))


def reference_loss(method, s: StudentTokens, teacher, view, rows, temperature) -> torch.Tensor:
    """The cross-tokenizer loss in float64 from materialised logits of both models, one position at a time."""
    h_s = s.hidden.double()
    w_s = s.weight.double()[: s.vocab_size]
    ids = torch.from_numpy(view.ids[rows]).long()
    attention = (torch.arange(ids.shape[1])[None] < torch.from_numpy(view.lengths[rows])[:, None]).long()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits.double()[..., : view.teacher_vocab]
    log_s = (h_s @ w_s.T / temperature).log_softmax(-1)
    log_t = (t_logits / temperature).log_softmax(-1)
    t_of, s_of = view.mapping
    total = h_s.sum() * 0
    for b, row in enumerate(rows):
        a = view.alignments[row]
        for k, (i, j) in enumerate(zip(a.pair_s, a.pair_t, strict=True)):
            if method == "uld":
                if not s.mask[b, i]:
                    continue
                p = log_s[b, i].exp().sort(descending=True).values
                q = log_t[b, j].exp().sort(descending=True).values
                p = torch.cat([p, p.new_zeros(len(q) - len(p))])
                total = total + (p - q).abs().sum()
            elif a.exact[k]:
                if not s.mask[b, i]:
                    continue
                q = torch.zeros(s.vocab_size, dtype=torch.float64)
                q.index_add_(0, torch.from_numpy(s_of), log_t[b, j].exp()[torch.from_numpy(t_of)])
                image = torch.from_numpy(np.unique(s_of))
                p = log_s[b, i].exp()
                q_in, p_in = q[image], p[image]
                q_rest, p_rest = 1 - q_in.sum(), 1 - p_in.sum()
                on = q_in > 0
                total = total + (q_in[on] * (q_in[on] / p_in[on]).log()).sum()
                if q_rest > 1e-12:
                    total = total + q_rest * (q_rest / p_rest).log()
            else:
                positions = a.span_s[a.span_s_id == k]
                if not s.mask[b, positions].all():
                    continue
                s_next = s.ids[b, positions + 1]
                t_pos = a.span_t[a.span_t_id == k]
                t_next = ids[b, t_pos + 1]
                lp = log_s[b, positions, s_next].sum()
                lq = log_t[b, t_pos, t_next].sum()
                pp, qq = lp.exp(), lq.exp()
                total = total + qq * (lq - lp) + (1 - qq) * ((1 - qq).log() - (1 - pp).log())
    return total / s.size


@pytest.mark.parametrize("method", ["align", "uld"])
def test_the_loss_and_its_gradient_equal_a_float64_reference(method, teacher_tok, student_tok):
    data = pack_text(CRAFTED * 2, student_tok, 12, with_texts=True)
    view = teacher_view(data, teacher_tok, student_tok, teacher_vocab=len(teacher_tok), student_vocab=len(student_tok))
    teacher, student = tiny_llama(teacher_tok, layers=2, seed=0), tiny_llama(student_tok, layers=1, seed=1)
    rows = np.array([3, 0, 5, 1])
    labels = torch.rand(4, 11, generator=torch.Generator().manual_seed(0)) > 0.2  # some positions not trained
    s = student_tokens(student, data, rows, len(student_tok), labels)
    hidden = s.hidden.detach().requires_grad_()
    s.hidden = hidden
    loss = CrossTokenizerSignal(method, view, 1.5, teacher=teacher).kd(s)
    (grad,) = torch.autograd.grad(loss, hidden)
    ref_hidden = hidden.detach().double().requires_grad_()
    s.hidden = ref_hidden
    ref = reference_loss(method, s, teacher, view, rows, 1.5)
    (ref_grad,) = torch.autograd.grad(ref, ref_hidden)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and ref.item() > 0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_align_is_forward_kl_exactly_when_both_tokenizers_are_the_same(teacher_tok, tmp_path):
    """On the same tokens, every position pairs with itself and every token maps to itself: forward KL."""
    data = pack_text(CRAFTED + [TEXT], teacher_tok, 16, with_texts=True)
    spelled = spellings(teacher_tok, 300)
    alignments = []
    for b in range(len(data)):
        starts, ends, text = data.texts.starts[b], data.texts.ends[b], [spelled[int(t)] for t in data.input_ids[b]]
        alignments.append(align_offsets(starts, ends, starts, ends, data.texts.following[b], text, text))
    assert sum(a.exact.size for a in alignments) > 0.95 * len(data) * 15
    length = np.full(len(data), data.input_ids.shape[1])
    view = TeacherView(
        data.input_ids.astype(np.int64), length, alignments, token_map(teacher_tok, teacher_tok, 300, 300), 300, 300
    )
    assert (view.mapping[0] == view.mapping[1]).all() and len(view.mapping[0]) == 300
    teacher, student = tiny_llama(teacher_tok, layers=2, seed=0), tiny_qwen2(teacher_tok, layers=1, seed=1)
    rows = np.arange(len(data))
    labels = torch.zeros(len(data), 15, dtype=torch.bool)
    for b, a in enumerate(alignments):
        labels[b, a.pair_s[a.exact]] = True  # the positions align compares (all but those before a split first char)
    s = student_tokens(student, data, rows, 300, labels)
    for temperature in (1.0, 2.0):
        align = CrossTokenizerSignal("align", view, temperature, teacher=teacher).kd(s)
        forward_kl = LiveLMSignal(teacher, "forward_kl", temperature).kd(s)
        assert align.item() == pytest.approx(forward_kl.item(), rel=1e-6)
    # In a run, align with one tokenizer is the ordinary path: the same blocks for both, token by token.
    teacher_dir = save_tiny(teacher, teacher_tok, tmp_path / "teacher")
    student_dir = save_tiny(student, teacher_tok, tmp_path / "student")
    path, _ = write_recipe(tmp_path, teacher_dir, student_dir, signal="live", cross_tokenizer="align")
    recipe = load_recipe(path)
    s = setup(recipe)
    assert s.teacher_view is None
    assert isinstance(student_batches(recipe, tmp_path / "run", s, Accelerator(cpu=True)).signal, LiveLMSignal)


@pytest.mark.parametrize("method", ["align", "uld"])
def test_the_cache_gives_the_live_loss_when_k_covers_the_vocabulary(method, teacher_tok, student_tok, tmp_path):
    data = pack_text(CRAFTED * 2, student_tok, 12, with_texts=True)
    view = teacher_view(data, teacher_tok, student_tok, teacher_vocab=len(teacher_tok), student_vocab=len(student_tok))
    teacher, student = tiny_llama(teacher_tok, layers=2, seed=0), tiny_llama(student_tok, layers=1, seed=1)
    options = {"temperature": 1.0, "teacher_id": "t", "data_id": data.fingerprint(), "device": "cpu"}
    cache = build_cross_cache(tmp_path / "c", teacher, data, view, k=400, **options, batch_size=3, chunk_size=7)
    rows = np.array([4, 2, 0])
    s = student_tokens(student, data, rows, len(student_tok))
    live = CrossTokenizerSignal(method, view, 1.0, teacher=teacher).kd(s)
    cached = CrossTokenizerSignal(method, view, 1.0, cache=cache).kd(s)
    assert cached.item() == pytest.approx(live.item(), rel=2e-3)  # float16 log-probs on disk
    small = build_cross_cache(tmp_path / "k8", teacher, data, view, k=8, **options)
    assert small.bytes_per_token < cache.bytes_per_token
    assert CrossTokenizerSignal(method, view, 1.0, cache=small).kd(s).item() > 0
    again = build_cross_cache(tmp_path / "c", teacher, data, view, k=400, **options)  # reopened, checksum verified
    assert (again.records == cache.records).all()
    with pytest.raises(DistillError, match="was made with data_id"):
        build_cross_cache(tmp_path / "c", teacher, data, view, k=400, **{**options, "data_id": "other"})


# ---- recipes: live and cache through the task, one tokenizer on two table sizes, bad input ----


def write_recipe(tmp_path, teacher_dir, student_dir, **distill) -> tuple:
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT + " " + " ".join(CRAFTED))
    raw = {
        "task": "causal_lm",
        "name": "xtok",
        "data": {"source": "text", "path": str(text), "block_size": 16, "heldout_fraction": 0.2},
        "teacher": {"path": str(teacher_dir)},
        "student": {
            "path": str(student_dir),
            "train": {"epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 3e-3, "log_every": 1},
        },
        "distill": {"cache_k": 8, "chunk_size": 32, "alpha": 0.5, **distill},
        "eval": {"batch_size": 4, "threads": 1, "generations": 0},
        "baseline": False,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


@pytest.mark.parametrize("signal", ["live", "cache"])
@pytest.mark.parametrize("method", ["align", "uld"])
def test_a_student_with_its_own_tokenizer_trains_from_the_live_teacher_and_from_the_cache(
    method, signal, teacher_tok, student_tok, tmp_path
):
    teacher_dir = save_tiny(tiny_llama(teacher_tok, layers=2, seed=0), teacher_tok, tmp_path / "teacher")
    student_dir = save_tiny(tiny_llama(student_tok, layers=1, seed=1), student_tok, tmp_path / "student")
    path, _ = write_recipe(tmp_path, teacher_dir, student_dir, signal=signal, cross_tokenizer=method)
    recipe = load_recipe(path)
    s = with_student(setup(recipe), recipe)
    assert s.vocab_size == len(student_tok) and s.teacher_view is not None
    assert s.tokenizer.get_vocab() == student_tok.get_vocab()  # the blocks are the student's tokens
    batches = student_batches(recipe, tmp_path / "run", s, Accelerator(cpu=True))
    assert isinstance(batches.signal, CrossTokenizerSignal)
    model = s.student_init
    terms = batches.loss(model, torch.arange(4), torch.device("cpu"))
    assert torch.isfinite(terms["loss"]) and terms["kd"] > 0 and terms["ce"] > 0
    terms["loss"].backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    if signal == "cache":
        assert list((tmp_path / "run" / "cache").glob("xtok-*/meta.json"))


def padded_pair(tok, tmp_path):
    """One tokenizer, two tables: the teacher padded to 304 rows, the student to 320 (as Qwen's 151,936 and 152,064)."""
    teacher = tiny_llama(tok, layers=2, seed=0)
    student = tiny_llama(tok, layers=1, seed=1)
    student.resize_token_embeddings(320, mean_resizing=False)
    torch.nn.init.normal_(student.lm_head.weight[300:], std=5.0)  # loud padding rows: they must not count
    assert (teacher.config.vocab_size, student.config.vocab_size) == (304, 320)
    return save_tiny(teacher, tok, tmp_path / "teacher"), save_tiny(student, tok, tmp_path / "student")


@pytest.mark.parametrize("signal", ["live", "cache"])
def test_one_tokenizer_on_tables_of_two_sizes_is_distilled_over_the_real_tokens(signal, teacher_tok, tmp_path):
    teacher_dir, student_dir = padded_pair(teacher_tok, tmp_path)
    path, _ = write_recipe(tmp_path, teacher_dir, student_dir, signal=signal, cache_mode="topk", cache_k=256)
    recipe = load_recipe(path)
    s = with_student(setup(recipe), recipe)
    assert s.vocab_size == 300 and s.teacher_view is None
    batches: LMBatches = student_batches(recipe, tmp_path / "run", s, Accelerator(cpu=True))
    rows = np.arange(4)
    kd = batches.signal.kd(student_tokens(s.student_init, s.train, rows, 300))
    ids = torch.from_numpy(s.train.input_ids[rows]).long()
    with torch.no_grad():
        log_s = s.student_init(input_ids=ids).logits[:, :-1, :300].double().log_softmax(-1)
        log_t = s.teacher(input_ids=ids).logits[:, :-1, :300].double().log_softmax(-1)
    if signal == "live":
        ref = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    else:  # the top 256 of the 300 real tokens, and the rest as one bucket on both sides
        top = log_t.topk(256, dim=-1).indices
        q, p = log_t.exp(), log_s.exp()
        q_top, p_top = q.gather(-1, top), p.gather(-1, top)
        q_rest, p_rest = 1 - q_top.sum(-1), 1 - p_top.sum(-1)
        ref = ((q_top * (q_top / p_top).log()).sum(-1) + q_rest * (q_rest / p_rest).log()).mean()
    assert kd.item() == pytest.approx(ref.item(), rel=2e-3 if signal == "cache" else 1e-5)


def test_a_run_with_one_tokenizer_on_two_table_sizes_finishes(teacher_tok, tmp_path):
    teacher_dir, student_dir = padded_pair(teacher_tok, tmp_path)
    path, _ = write_recipe(tmp_path, teacher_dir, student_dir, signal="live")
    metrics = run_lm(load_recipe(path), tmp_path / "run")
    student = metrics["models"]["student"]
    assert np.isfinite(student["perplexity"]) and student["kl_to_teacher"] >= 0


def test_a_run_across_tokenizers_reports_bits_per_character(teacher_tok, student_tok, tmp_path):
    """Across tokenizers the report compares bits per character, each model through its own tokenizer; nothing
    token by token (no teacher perplexity on the student's tokens, no agreement, KL, teacher check or token KL)."""
    from distill.data.token_blocks import SEPARATOR
    from distill.evaluate import bits_per_char

    teacher_dir = save_tiny(tiny_llama(teacher_tok, layers=1, seed=0), teacher_tok, tmp_path / "teacher")
    student_dir = save_tiny(tiny_llama(student_tok, layers=1, seed=1), student_tok, tmp_path / "student")
    path, raw = write_recipe(tmp_path, teacher_dir, student_dir, signal="live", cross_tokenizer="align")
    raw |= {"baseline": True, "eval": raw["eval"] | {"generations": 1, "generation_tokens": 3}}
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    metrics = run_lm(recipe, tmp_path / "run")
    models = metrics["models"]
    assert all("bits_per_char" in m and m["kl_to_teacher"] is None for m in models.values())
    assert models["teacher"]["perplexity"] is None and np.isfinite(models["student"]["perplexity"])
    s = setup(recipe)
    chunks = [doc for text in s.heldout.texts.texts for doc in text.split(SEPARATOR) if doc]
    teacher = load_causal_lm(teacher_dir)[0]
    assert models["teacher"]["bits_per_char"] == pytest.approx(bits_per_char(teacher, teacher_tok, chunks), rel=1e-6)
    assert "token_kl" not in metrics and "teacher" not in metrics["generations"][0]
    assert not any("teacher is not" in w for w in metrics["warnings"])
    report = (tmp_path / "run" / "REPORT.md").read_text()
    assert "bits per character" in report and "held-out bits/char" in report


def test_bad_input_is_one_line(teacher_tok, student_tok, tmp_path):
    teacher_dir = save_tiny(tiny_llama(teacher_tok, layers=1, seed=0), teacher_tok, tmp_path / "teacher")
    student_dir = save_tiny(tiny_llama(student_tok, layers=1, seed=1), student_tok, tmp_path / "student")
    path, raw = write_recipe(tmp_path, teacher_dir, student_dir, signal="live")
    # Different tokenizers without a method: the check that stops them names the options.
    with pytest.raises(DistillError, match="distill.cross_tokenizer: align") as caught:
        setup(load_recipe(path))
    assert "\n" not in str(caught.value)
    llama = tiny_llama(teacher_tok).config
    assert check_vocab(teacher_tok, student_tok, llama, llama, cross_tokenizer="uld") == len(student_tok)
    # A Python (slow) tokenizer gives no offsets: ByT5's, say.
    with pytest.raises(DistillError, match="student tokenizer \\(ByT5Tokenizer\\) gives no character offsets"):
        check_offsets(teacher_tok, ByT5Tokenizer())
    # A student tokenizer that lowercases cannot spell the text back.
    lower = other_tokenizer(normalizer=normalizers.Lowercase())
    save_tiny(tiny_llama(lower, layers=1, seed=1), lower, tmp_path / "lower")
    raw["student"]["path"] = str(tmp_path / "lower")
    raw["distill"]["cross_tokenizer"] = "align"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [sys.executable, "-m", "distill.cli", "run", str(path), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and "cannot round-trip the text" in line and "'the" in line, line
    # Recipes that cannot work across tokenizers.
    for change, message in (
        ({"distill": {"cross_tokenizer": "uld", "loss": "reverse_kl"}}, "leave distill.loss at forward_kl"),
        ({"distill": {"cross_tokenizer": "uld", "signal": "recorded"}}, "live or from its cache"),
        ({"teacher": {"path": "x", "train": {"epochs": 1}}, "distill": {"cross_tokenizer": "align"}}, "teacher.train"),
    ):
        bad = {**raw, **{key: {**raw[key], **value} for key, value in change.items()}}
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(DistillError, match=message):
            load_recipe(path)


def test_block_texts_travel_with_their_blocks(student_tok):
    data = pack_text(CRAFTED, student_tok, 8, with_texts=True)
    assert isinstance(data.texts, BlockTexts) and len(data.texts.texts) == len(data)
    part = data.subset([2, 0])
    assert part.texts.texts == [data.texts.texts[2], data.texts.texts[0]]
    for b in range(len(data)):  # each token's span spells its bytes (a split character: the pieces together)
        text, ends = data.texts.texts[b], data.texts.ends[b]
        assert ends[-1] == len(text) and data.texts.starts[b][0] == 0
    with pytest.raises(DistillError, match="document 1 holds a NUL character"):
        pack_text(["fine", "not\x00fine"], student_tok, 2, with_texts=True)
