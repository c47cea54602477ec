"""Tiny BERT sentence encoders and a tiny labeled text set, built offline for the text tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOPICS = {
    "space": "orbit rocket planet moon launch star telescope nasa shuttle galaxy",
    "sport": "goal match team player score coach season league ball referee",
    "food": "bread cheese recipe oven salt garlic soup dinner pasta butter",
}
WORDS = sorted({w for words in TOPICS.values() for w in words.split()} | {"the", "a", "and", "of", "was", "great"})


def tiny_bert_tokenizer(extra_tokens: int = 0, words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + words + [f"w{i}" for i in range(extra_tokens)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_bert(tokenizer, layers: int = 4, hidden: int = 32, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertModel(config).eval()


def save_sentence_encoder(folder: Path, model, tokenizer, *, normalize: bool = True, pooling: str = "mean") -> Path:
    """An HF folder plus sentence-transformers' modules.json and pooling config, like the real assets."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pool = {
        "word_embedding_dimension": model.config.hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    return folder


def topic_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (text, topic) pairs: six words of one topic mixed with filler words."""
    generator = torch.Generator().manual_seed(seed)
    names = sorted(TOPICS)
    rows = []
    for i in range(n):
        topic = names[i % len(names)]
        words = TOPICS[topic].split()
        picks = torch.randint(len(words), (6,), generator=generator).tolist()
        rows.append((" ".join(["the"] + [words[j] for j in picks] + ["and", "a"]), topic))
    return rows


def write_topic_csv(folder: Path, n_train: int = 90, n_test: int = 30, unlabeled_every: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        with (folder / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for i, (text, label) in enumerate(topic_texts(n, seed)):
                hide = split == "train" and unlabeled_every and (i // 3) % unlabeled_every  # whole topic triples
                writer.writerow([text, "" if hide else label])
    return folder
