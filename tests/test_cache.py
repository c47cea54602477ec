import json

import numpy as np
import pytest
import torch

from distill.errors import DistillError
from distill.models.classifiers import mlp
from distill.teachers.live import LiveTeacher
from distill.teachers.logits_cache import LogitsCache, build_logits_cache


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return LiveTeacher(mlp(6, [8], 4))


def test_cache_holds_exactly_the_teacher_logits_in_batch_order(tmp_path, teacher):
    x = np.random.default_rng(0).random((50, 6)).astype(np.float32)
    cache = build_logits_cache(tmp_path / "c", teacher, x, teacher_id="t1", data_id="d1", batch_size=16)
    assert isinstance(cache.logits, np.memmap)
    indices = torch.tensor([49, 3, 17, 3, 0])
    expected = teacher(indices, torch.from_numpy(x[indices.numpy()]))
    torch.testing.assert_close(cache(indices), expected, rtol=0, atol=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temp folder left behind"
    # A second student reuses it without recomputing.
    again = build_logits_cache(tmp_path / "c", None, x, teacher_id="t1", data_id="d1")
    assert again.meta == cache.meta


def test_mismatched_or_corrupt_cache_is_refused(tmp_path, teacher):
    x = np.random.default_rng(0).random((20, 6)).astype(np.float32)
    build_logits_cache(tmp_path / "c", teacher, x, teacher_id="t1", data_id="d1")
    with pytest.raises(DistillError, match="made with teacher 't1' but this run has 't2'"):
        LogitsCache.open(tmp_path / "c", teacher="t2", data="d1")
    with pytest.raises(DistillError, match="made with data 'd1' but this run has 'd9'"):
        LogitsCache.open(tmp_path / "c", teacher="t1", data="d9")
    logits = tmp_path / "c" / "logits.npy"
    logits.write_bytes(logits.read_bytes()[:-8])
    with pytest.raises(DistillError, match="logits.npy fails its checksum; delete it"):
        LogitsCache.open(tmp_path / "c", teacher="t1", data="d1")
    (tmp_path / "c" / "meta.json").write_text("{not json")
    with pytest.raises(DistillError, match="meta.json is corrupt"):
        LogitsCache.open(tmp_path / "c", teacher="t1", data="d1")
    (tmp_path / "c" / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DistillError, match="has format 'other'"):
        LogitsCache.open(tmp_path / "c", teacher="t1", data="d1")


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    x = np.zeros((40, 6), np.float32)
    calls = []

    def failing_teacher(indices, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("teacher crashed")
        return torch.zeros(len(batch), 4)

    with pytest.raises(RuntimeError):
        build_logits_cache(tmp_path / "c", failing_teacher, x, teacher_id="t", data_id="d", batch_size=16)
    assert list(tmp_path.iterdir()) == []


def test_live_teacher_is_frozen_and_out_of_autograd(teacher):
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    out = teacher(torch.arange(2), torch.randn(2, 6))
    assert not out.requires_grad and not out.is_inference()
