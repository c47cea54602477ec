"""Tiny causal LMs built offline for tests: a BPE tokenizer trained on inline text, random Llama/Qwen2 models."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distill.models.causal_lm import save_causal_lm

TEXT = (
    "a teacher model is large and slow while a student model is small and fast . the student learns to copy "
    "the soft predictions of the teacher one token at a time . distillation uses a temperature to soften both "
    "distributions and a loss that compares them . the quick brown fox jumps over the lazy dog near the river "
    "bank . numbers like one two three four five six seven eight nine ten appear in counting lessons . "
    "the weather today is sunny with a light breeze and the evening will be cool and quiet . "
    "language models predict the next word given the previous words in a sentence or a paragraph . "
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>"]


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on TEXT in milliseconds; ids 0, 1, 2 are <pad>, <eos>, <bos>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _common(tokenizer, layers: int) -> dict:
    return dict(
        vocab_size=-(-len(tokenizer) // 8) * 8,  # padded rows, as real checkpoints often have
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_llama(tokenizer, layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """Untied embeddings and LM head."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**_common(tokenizer, layers), tie_word_embeddings=False)).eval()


def tiny_qwen2(tokenizer, layers: int = 4, seed: int = 0) -> Qwen2ForCausalLM:
    """Tied embeddings, q/k/v biases, and alternating sliding/full attention so ``layer_types`` matters."""
    torch.manual_seed(seed)
    layer_types = ["sliding_attention" if i % 2 else "full_attention" for i in range(layers)]
    config = Qwen2Config(
        **_common(tokenizer, layers),
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=8,
        layer_types=layer_types,
    )
    return Qwen2ForCausalLM(config).eval()


def save_tiny(model: PreTrainedModel, tokenizer, folder: Path) -> Path:
    return save_causal_lm(model, tokenizer, folder)
