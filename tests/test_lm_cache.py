"""Offline LM teacher cache: round trip, size per token, resume, and the errors a user can meet."""

import json

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.losses.sparse import sparse_targets_from_logits
from distill.recipe import LMDistillSpec
from distill.teachers.lm_cache import LMCache, block_generator, build_lm_cache, ensure_lm_cache

N, S, V, V_PAD, TEMP = 7, 5, 40, 48, 2.0
IDS = dict(teacher_id="teacher-a", data_id="data-1")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread (conftest.py)


class Teacher:
    """A fixed random bigram-ish LM with a padded vocabulary; counts the blocks it is asked for."""

    def __init__(self, vocab=V_PAD, fail_after=None):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(64, vocab, generator=g) * 3
        self.blocks, self.fail_after = 0, fail_after

    def __call__(self, ids):
        if self.fail_after is not None and self.blocks >= self.fail_after:
            raise RuntimeError("teacher crashed")
        self.blocks += len(ids)
        return self.table[ids % 64]


def data(n=N, s=S):
    return np.random.default_rng(0).integers(0, V, size=(n, s))


def build(path, teacher=None, **kw):
    kw = {"mode": "sampled", "k": 16, "temperature": TEMP, "vocab_size": V, "shard_blocks": 2, "batch_size": 3, **kw}
    return build_lm_cache(teacher or Teacher(), data(), path, progress=False, **IDS, **kw)


def files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("mode,k", [("sampled", 16), ("topk", 8)])
def test_round_trip_equals_targets_from_logits(tmp_path, mode, k):
    build(tmp_path / "c", mode=mode, k=k, seed=5)
    cache = LMCache.open(tmp_path / "c", **IDS, temperature=TEMP, mode=mode)
    assert len(cache) == N and cache.mode == mode
    blocks = torch.tensor([6, 0, 3, 3])  # unsorted, across shards, repeated
    got = cache[blocks]
    assert got.ids.shape == (4, S, k) and got.ids.dtype == torch.int64
    logits = Teacher()(torch.from_numpy(data()))
    for row, b in enumerate(blocks.tolist()):
        want = sparse_targets_from_logits(
            logits[b], mode=mode, k=k, temperature=TEMP, vocab_size=V, generator=block_generator(5, b)
        )
        assert torch.equal(got.ids[row], want.ids)
        if mode == "topk":
            assert torch.equal(got.logp[row], want.logp.half().float())
            assert torch.equal(got.tail[row], want.tail.half().float())
    assert cache[torch.tensor(2)].ids.shape == (S, k)
    with pytest.raises(IndexError):
        cache[torch.tensor([N])]


def test_bytes_per_token(tmp_path):
    for vocab, bpt in ((151_936, 64), (49_152, 32)):
        teacher = lambda ids, vocab=vocab: torch.randn(*ids.shape, vocab)  # noqa: E731
        path = build_lm_cache(
            teacher, data(2, 3), tmp_path / str(vocab), temperature=1.0, vocab_size=vocab, progress=False, **IDS
        )
        cache = LMCache.open(path, **IDS)
        assert cache.bytes_per_token == bpt
        assert cache[torch.tensor([0])].ids.max() < vocab
        assert json.loads((path / "meta.json").read_text())["dtypes"]["ids"] == ("uint32" if bpt == 64 else "uint16")
    build(tmp_path / "topk", mode="topk", k=8)
    assert LMCache.open(tmp_path / "topk", **IDS).bytes_per_token == 8 * 2 + 8 * 2 + 2


def test_progress_prints_bytes_per_token(tmp_path, capsys):
    for _ in range(2):  # building, then finding it finished: both report the size
        build_lm_cache(Teacher(), data(), tmp_path / "c", temperature=TEMP, vocab_size=V, shard_blocks=4, **IDS)
        out = capsys.readouterr().out
        assert f"{N * S} tokens, 32 bytes/token" in out  # vocab 40 fits uint16: 16 × 2 bytes
    assert "shard" not in out


def test_finished_cache_is_not_recomputed(tmp_path):
    build(tmp_path / "c")
    teacher = Teacher()
    build(tmp_path / "c", teacher)
    assert teacher.blocks == 0


def test_resume_after_deleting_the_last_shard(tmp_path):
    ref = files(build(tmp_path / "ref"))
    (tmp_path / "ref" / "shard-00003.npy").unlink()
    teacher = Teacher()
    build(tmp_path / "ref", teacher)
    assert teacher.blocks == 1  # only the last shard's single block
    assert files(tmp_path / "ref") == ref


@pytest.mark.parametrize("mode", ["sampled", "topk"])
def test_resume_after_a_crash_equals_an_uninterrupted_build(tmp_path, mode):
    ref = files(build(tmp_path / "ref", mode=mode, k=4))
    with pytest.raises(RuntimeError, match="crashed"):
        build(tmp_path / "c", Teacher(fail_after=3), mode=mode, k=4, batch_size=1)  # dies halfway through shard 1
    assert not (tmp_path / "c" / "meta.json").exists()
    assert (tmp_path / "c" / "progress.json").exists()
    (tmp_path / "c" / ".shard-00001.npy.tmp-99999").write_bytes(b"half a shard")  # as a SIGKILL would leave it
    teacher = Teacher()
    build(tmp_path / "c", teacher, mode=mode, k=4)  # another batch size: same bytes
    assert teacher.blocks == N - 2  # shard 0 was kept
    assert files(tmp_path / "c") == ref


def test_build_refuses_a_folder_made_with_other_settings(tmp_path):
    build(tmp_path / "c")
    with pytest.raises(DistillError, match=r"k=16.*8"):
        build(tmp_path / "c", k=8)


def test_mismatched_teacher_or_data_id(tmp_path):
    build(tmp_path / "c")
    with pytest.raises(DistillError, match=r"teacher_id 'teacher-a' but this run has 'teacher-b'.*distill cache"):
        LMCache.open(tmp_path / "c", teacher_id="teacher-b", data_id="data-1")
    with pytest.raises(DistillError, match=r"data_id 'data-1' but this run has 'data-2'"):
        LMCache.open(tmp_path / "c", teacher_id="teacher-a", data_id="data-2")
    with pytest.raises(DistillError, match=r"temperature 2.0 but this run has 1.0"):
        LMCache.open(tmp_path / "c", **IDS, temperature=1.0)
    with pytest.raises(DistillError, match=r"mode 'sampled' but this run has 'topk'"):
        LMCache.open(tmp_path / "c", **IDS, mode="topk")


def test_truncated_or_missing_shard(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DistillError, match=r"shard-00002\.npy has \d+ bytes, expected \d+") as err:
        LMCache.open(tmp_path / "c", **IDS)
    assert "\n" not in str(err.value)
    shard.unlink()
    with pytest.raises(DistillError, match=r"shard-00002\.npy is missing"):
        LMCache.open(tmp_path / "c", **IDS)


def test_corrupt_or_missing_meta(tmp_path):
    build(tmp_path / "c")
    meta = tmp_path / "c" / "meta.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    with pytest.raises(DistillError, match="meta.json is corrupt"):
        LMCache.open(tmp_path / "c", **IDS)
    meta.write_text(json.dumps({**json.loads(good), "shards": "nope"}))
    with pytest.raises(DistillError, match="meta.json is corrupt"):
        LMCache.open(tmp_path / "c", **IDS)
    meta.unlink()
    with pytest.raises(DistillError, match="no meta.json"):
        LMCache.open(tmp_path / "c", **IDS)


def test_checksum_verification(tmp_path):
    build(tmp_path / "c")
    shard = tmp_path / "c" / "shard-00000.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    LMCache.open(tmp_path / "c", **IDS)  # size is right: only verify=True reads the bytes
    with pytest.raises(DistillError, match="checksum"):
        LMCache.open(tmp_path / "c", **IDS, verify=True)


def test_a_run_reusing_a_cache_checks_every_shard_checksum(tmp_path):
    """Issue 17.5: runs checked only each shard's size, so a same-size corrupted shard was served."""
    spec = LMDistillSpec(signal="cache", cache_mode="sampled", cache_k=16, temperature=TEMP, cache_shard_blocks=2)
    build(tmp_path / "c")
    reuse = dict(teacher=None, train_ids=data(), d=spec, **IDS, vocab_size=V, seed=0, device="cpu")
    assert len(ensure_lm_cache(tmp_path / "c", **reuse)) == N
    shard = tmp_path / "c" / "shard-00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DistillError, match="shard-00001.npy fails its checksum; delete it"):
        ensure_lm_cache(tmp_path / "c", **reuse)


def test_several_sets_give_fresh_draws_each_epoch_and_set_0_is_the_one_set_cache(tmp_path):
    """Issue 19.4: sets·k draws per token; epoch e reads set e mod sets; set 0 is byte-for-byte the draws a one-set
    cache stores (the sets are consecutive draws of the block's stream), and a one-set cache keeps its old meta."""
    build(tmp_path / "one", seed=5)
    build(tmp_path / "three", seed=5, sets=3)
    one = LMCache.open(tmp_path / "one", **IDS, temperature=TEMP)
    three = LMCache.open(tmp_path / "three", **IDS, temperature=TEMP)
    assert "sets" not in one.meta and (three.sets, one.sets) == (3, 1)
    assert three.bytes_per_token == 3 * one.bytes_per_token
    blocks = torch.arange(N)
    assert torch.equal(three.targets(blocks, 0).ids, one[blocks].ids)
    epochs = [three.targets(blocks, e).ids for e in range(4)]
    assert all(ids.shape == (N, S, 16) for ids in epochs)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert torch.equal(epochs[3], epochs[0])  # epoch 3 wraps to set 0
    assert torch.equal(one.targets(blocks, 2).ids, one[blocks].ids)  # one set: every epoch the same
    # the three sets are three draws of 16, one after another, from the block's stream
    for block in (0, 4):
        logits, generator = Teacher()(torch.from_numpy(data()[block : block + 1]).long())[0], block_generator(5, block)
        for e in range(3):
            drawn = sparse_targets_from_logits(
                logits, mode="sampled", k=16, temperature=TEMP, generator=generator, vocab_size=V
            ).ids
            assert torch.equal(epochs[e][block], drawn)
    with pytest.raises(DistillError, match="bad LM cache sets=2: at least 1, and 1 for topk"):
        build(tmp_path / "topk", mode="topk", k=4, sets=2)


def test_fresh_draws_each_epoch_fit_the_teacher_better_than_one_fixed_set():
    """Why sets exist: free student logits trained to convergence on one fixed set of k draws end at the draws'
    empirical distribution; on a fresh set each epoch they end near the teacher's (KL to the teacher several times
    lower). Float64, seeded; the same steps and learning rate for both."""
    from distill.losses.sparse import SparseTargets, sparse_kd_loss

    k, sets, positions, vocab = 8, 16, 64, 20
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(positions, vocab, generator=generator, dtype=torch.float64) * 2
    draws = torch.multinomial(teacher.softmax(-1), k * sets, replacement=True, generator=generator)

    def fit(epoch_set) -> float:
        student = torch.zeros(positions, vocab, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.SGD([student], lr=2.0)
        for epoch in range(sets * 40):
            ids = draws[:, epoch_set(epoch) * k : (epoch_set(epoch) + 1) * k]
            optimizer.zero_grad()
            sparse_kd_loss(student, SparseTargets(ids)).backward()
            optimizer.step()
        p_teacher = teacher.log_softmax(-1)
        return (p_teacher.exp() * (p_teacher - student.detach().log_softmax(-1))).sum(-1).mean().item()

    fixed, fresh = fit(lambda epoch: 0), fit(lambda epoch: epoch % sets)
    print(f"KL to the teacher: fixed {fixed:.4f}, fresh {fresh:.4f}")
    assert fresh < fixed / 3, (fresh, fixed)
