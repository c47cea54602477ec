"""SmoothQuant before dynamic int8: the smoothed float model is the same model, and its int8 copy is closer."""

from __future__ import annotations

import pytest
import torch
from lm_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer
from torch import nn

from distill.export.smooth import activation_ranges, int8_kl, smooth_llama, smoothable_layers, smoothed


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def blocks(tokenizer, n: int, seq: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (n, seq), generator=g)


def with_outlier_channels(model: nn.Module) -> nn.Module:
    """Real LLMs have a few hidden channels tens of times larger than the rest; random ones do not."""
    with torch.no_grad():
        for layer in smoothable_layers(model):
            layer.input_layernorm.weight[[3, 17]] = 40.0
            layer.post_attention_layernorm.weight[5] = 30.0
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothed_float_model_is_the_same_model(tokenizer, build, alpha):
    model = with_outlier_channels(build(tokenizer).double())
    ids = blocks(tokenizer, 4)
    copy_ = smoothed(model, activation_ranges(model, ids), alpha)
    with torch.inference_mode():
        before, after = model(input_ids=ids).logits, copy_(input_ids=ids).logits
    norm = copy_.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, model.model.layers[0].input_layernorm.weight)  # something was folded
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-9)


def test_smoothing_brings_int8_closer_to_the_float_model(tokenizer):
    model = with_outlier_channels(tiny_llama(tokenizer))
    calibration, scored = blocks(tokenizer, 16, seed=1), blocks(tokenizer, 8, seed=2)
    smooth, alpha = smooth_llama(model, calibration)
    assert alpha is not None
    with torch.inference_mode():
        reference = torch.log_softmax(model(input_ids=scored).logits, -1)
    assert int8_kl(reference, smooth, scored) < 0.8 * int8_kl(reference, model, scored)


def test_models_without_llama_layers_are_left_alone():
    mlp = nn.Sequential(nn.Linear(4, 4))
    assert smoothable_layers(mlp) == []
    assert smooth_llama(mlp, torch.zeros(2, 3, dtype=torch.long)) == (mlp, None)
