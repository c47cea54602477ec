"""Export a Llama-family causal LM and its byte-level BPE tokenizer to a GGUF file for llama.cpp.

The layout follows llama.cpp's ``convert_hf_to_gguf.py``: tensors under llama.cpp names, attention query and key
weights permuted for its RoPE layout (transformers' GGUF loader undoes that on load), 1-D tensors in F32, and the
tokenizer as a "gpt2" vocabulary with its merges and special token ids.

The 4/5-bit types (q4_0, q4_1, q5_0, q5_1) write the mix ``distill.models.gguf_grid.grid_types`` names: the block
linears in that type, the token embedding (and an untied output matrix) in Q8_0, so a student trained on those grids
(quantization-aware distillation) is written exactly as it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.devices import to_numpy
from distill.errors import DistillError
from distill.io import atomic_path
from distill.models.gguf_grid import check_rows, grid_types

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
QTYPES = ("f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")

# llama.cpp's token types (gguf.TokenType): NORMAL, CONTROL, USER_DEFINED, UNUSED.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

# llama.cpp pre-tokenizer names for the regexes transformers' GGUF loader knows, so a reload splits text the same way.
_LLAMA3_SPLIT_NAME = "llama-bpe"
_QWEN2_SPLIT_NAME = "qwen2"


def export_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, qtype: str = "f16"
) -> Path:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``path`` (temp file, then renamed) and return ``path``.

    ``qtype`` "f16" stores matrices in F16; "q8_0" quantises matrices whose rows are a multiple of 32 values and keeps
    the others in F16. "q4_0", "q4_1", "q5_0" and "q5_1" store the attention and MLP matrices in that type and the
    token embedding and output matrix in Q8_0 (``gguf_grid.grid_types``), and refuse a matrix whose rows they cannot
    pack. Norms and other 1-D tensors are always F32.
    """
    import gguf

    path = Path(path)
    if qtype not in QTYPES:
        raise DistillError(f"unknown GGUF type {qtype!r}: use one of {', '.join(QTYPES)}")
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DistillError(
            f"GGUF export supports llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"this model's model_type is {model_type!r}"
        )
    _check_config(config)
    grid = None if qtype in ("f16", "q8_0") else grid_types(model, qtype)  # the QAD mix; None: one type for all
    if grid is not None:
        check_rows(model, qtype)
    tokens, token_types, merges, pre = _byte_level_vocab(tokenizer, config.vocab_size)

    n_head, n_head_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    tied = _tied(model, config, state)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.upper()}")

    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name(_model_name(model, config))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    if qtype != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    add_bos, add_eos = _adds_special_tokens(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)

    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        if "rotary_emb" in hf_name:
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise DistillError(f"GGUF export has no llama.cpp name for the tensor {hf_name!r}")
        data = to_numpy(tensor.float())
        if gguf_name.endswith("attn_q.weight"):
            data = _permute(data, n_head, n_head)
        elif gguf_name.endswith("attn_k.weight"):
            data = _permute(data, n_head, n_head_kv)
        _add_tensor(writer, gguf_name, data, qtype if grid is None else grid.get(hf_name, "f16"))

    with atomic_path(path) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def matrix_types(path: str | Path) -> dict[str, int]:
    """How many matrices (tensors of two or more dimensions) of a GGUF file are stored in each type, e.g.
    ``{"Q8_0": 210, "F16": 1}``."""
    import gguf

    types = [t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1]
    return {name: types.count(name) for name in sorted(set(types))}


def _check_config(config) -> None:
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise DistillError("GGUF export does not support llama models with attention or MLP biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise DistillError(f"GGUF export supports llama models with silu activation, not {config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise DistillError(f"GGUF export supports plain RoPE only; this model uses rope_type {rope_type!r}")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _tied(model: PreTrainedModel, config, state: dict) -> bool:
    if "lm_head.weight" not in state:
        return True
    if getattr(config, "tie_word_embeddings", False):
        return True
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _model_name(model: PreTrainedModel, config) -> str:
    name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    return Path(str(name)).name or "model"


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: interleaved rotary pairs instead of HF's rotate-half halves."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_tensor(writer, name: str, data: np.ndarray, qtype: str) -> None:
    """1-D tensors in F32; a matrix in ``qtype`` when its rows pack into blocks of 32 values, else in F16 (only q8_0
    gets here with such a matrix: the 4/5-bit exports refuse it up front)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if data.ndim <= 1 or name.endswith("_norm.weight"):
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return
    block = 32
    if qtype != "f16" and data.shape[-1] % block == 0:
        raw = GGMLQuantizationType[qtype.upper()]
        writer.add_tensor(name, quantize(np.ascontiguousarray(data, dtype=np.float32), raw), raw_dtype=raw)
        return
    writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))


def _backend_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DistillError(
            f"GGUF export needs a fast (tokenizers-backed) byte-level BPE tokenizer, got {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the backend's pre-tokenizer, or DistillError if unrecognised."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    def byte_level(step: dict, regex: bool) -> bool:
        return (
            step.get("type") == "ByteLevel"
            and not step.get("add_prefix_space", False)
            and bool(step.get("use_regex", True)) == regex
        )

    if pre is not None and byte_level(pre, regex=True):
        return "gpt-2"  # llama.cpp's name; transformers reads an unknown name as this same byte-level default
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and byte_level(steps[1], regex=True):
        first = steps[0]
        if first.get("type") == "Digits" and first.get("individual_digits"):
            return "smollm"
    if len(steps) == 2 and byte_level(steps[1], regex=False) and steps[0].get("type") == "Split":
        regex = (steps[0].get("pattern") or {}).get("Regex")
        preferred = {_LLAMA3_SPLIT_NAME, _QWEN2_SPLIT_NAME}
        names = sorted(n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex)
        if names:
            return next((n for n in names if n in preferred), names[0])
    raise DistillError(
        "GGUF export supports byte-level BPE tokenizers whose pre-tokenizer llama.cpp knows "
        f"(GPT-2, SmolLM, Llama 3, Qwen2 ...); this tokenizer's pre-tokenizer is {json.dumps(pre)[:200]}"
    )


def _byte_level_vocab(
    tokenizer: PreTrainedTokenizerBase, vocab_rows: int
) -> tuple[list[str], list[int], list[str], str]:
    """Tokens (padded to the embedding rows), their llama.cpp types, merges, and the pre-tokenizer name."""
    spec = _backend_json(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        raise DistillError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))

    vocab = tokenizer.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise DistillError("GGUF export needs token ids numbered 0..n-1 without gaps")
    if n > vocab_rows:
        raise DistillError(f"the tokenizer has {n} tokens but the model only {vocab_rows} embedding rows")
    tokens = [""] * n
    for token, index in vocab.items():
        tokens[index] = token
    types = [TOKEN_NORMAL] * n
    for added in spec.get("added_tokens", []):
        if 0 <= added["id"] < n:
            types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    # Embedding rows past the tokenizer, as convert_hf_to_gguf pads them.
    for index in range(n, vocab_rows):
        tokens.append(f"[PAD{index}]")
        types.append(TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, pre


def _adds_special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, bool]:
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    add_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return add_bos, add_eos
