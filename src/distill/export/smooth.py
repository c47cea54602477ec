"""SmoothQuant (Xiao et al. 2023) for Llama-family decoders: move activation outliers into the weights before
dynamic int8, so that the per-tensor int8 scale of each activation is no longer set by a few huge channels.

For a Linear ``y = W x`` fed by an operation that can absorb a per-channel factor, ``x_j / s_j`` and
``W[:, j] * s_j`` give the same ``y`` in exact arithmetic. The factor is folded into
- the RMSNorm before q/k/v (its weight is divided by ``s``), and the one before gate/up;
- the rows of ``up_proj`` before ``down_proj`` (the MLP's input to ``down_proj`` is ``act(gate) * up``).
``s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)`` balances the two ranges. One alpha for the whole model, the
one whose int8 copy stays closest (KL per token) to the float model on the calibration blocks.

Measured on the 6-layer SmolLM2 student (BENCHMARKS.md): held-out perplexity +8.3% with plain dynamic int8.
Tried and dropped: folding o_proj's factors into v_proj (worse at every alpha), and choosing alpha per layer by
each layer's own int8 output error (worse than one alpha for all: the local error misjudges what reaches the
logits).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

ALPHAS = (0.5, 0.6, 0.7, 0.8)
CALIBRATION_BLOCKS = 64  # fewer gave noisier ranges: 16 blocks left the SmolLM2 student at +2.1%, 64 at +1.4–1.9%
SCORED_BLOCKS = 16  # blocks after those, on which each alpha's int8 copy is compared with the float model
FLOAT_TOLERANCE = 1e-2  # max |log-prob| difference allowed between the smoothed and the original float model


def smoothable_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers with the Llama shape (RMSNorm → q/k/v, RMSNorm → gate/up, up → down), else []."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return []
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = [(attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))]
        if any(
            part is None or not all(isinstance(getattr(part, n, None), nn.Linear) for n in ns) for part, ns in parts
        ):
            return []
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        # a norm that scales by (1 + weight), as Gemma's does, cannot absorb 1/s by dividing its weight
        if any(n is None or getattr(n, "weight", None) is None or "Gemma" in type(n).__name__ for n in norms):
            return []
    return list(layers)


def _folds(layer: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None, list[nn.Linear]]]:
    """(what produces the activation: weight, bias; the Linears that consume it) for one decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    return [
        (layer.input_layernorm.weight, None, [attn.q_proj, attn.k_proj, attn.v_proj]),
        (layer.post_attention_layernorm.weight, None, [mlp.gate_proj, mlp.up_proj]),
        (mlp.up_proj.weight, mlp.up_proj.bias, [mlp.down_proj]),
    ]


@torch.inference_mode()
def activation_ranges(
    model: nn.Module, calibration: torch.Tensor, batch_size: int = 8
) -> dict[tuple[int, int], torch.Tensor]:
    """max |x_j| per input channel of each fold's activation, keyed (layer, fold), over all calibration blocks."""
    ranges: dict[tuple[int, int], torch.Tensor] = {}

    def recorder(key):
        def record(module, args):
            x = args[0].detach().flatten(0, -2).abs().amax(0).float()
            ranges[key] = torch.maximum(ranges[key], x) if key in ranges else x

        return record

    hooks = [
        linears[0].register_forward_pre_hook(recorder((i, j)))
        for i, layer in enumerate(smoothable_layers(model))
        for j, (_, _, linears) in enumerate(_folds(layer))
    ]
    try:
        for start in range(0, len(calibration), batch_size):
            model(input_ids=calibration[start : start + batch_size], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def smoothing_factors(x_range: torch.Tensor, linears: list[nn.Linear], alpha: float) -> torch.Tensor:
    w_range = torch.stack([lin.weight.detach().abs().amax(0).float() for lin in linears]).amax(0)
    return (x_range.clamp(min=1e-5).pow(alpha) / w_range.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smoothed(model: nn.Module, ranges: dict[tuple[int, int], torch.Tensor], alpha: float) -> nn.Module:
    """A copy of ``model`` with every fold smoothed at ``alpha``."""
    model = copy.deepcopy(model).eval()
    for i, layer in enumerate(smoothable_layers(model)):
        for j, (weight, bias, linears) in enumerate(_folds(layer)):
            s = smoothing_factors(ranges[(i, j)], linears, alpha)
            weight.div_(s.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
            if bias is not None:
                bias.div_(s.to(bias.dtype))
            for lin in linears:
                lin.weight.mul_(s.to(lin.weight.dtype))
    return model


@torch.inference_mode()
def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


@torch.inference_mode()
def int8_kl(reference: torch.Tensor, model: nn.Module, ids: torch.Tensor) -> float:
    """Mean per-token KL(float ‖ int8 copy of ``model``) on ``ids``; ``reference``: the float model's log-probs."""
    from distill.export.quantize import quantize_int8

    got = _log_probs(quantize_int8(model), ids)
    return float((reference.exp() * (reference - got)).sum(-1).mean())


def smooth_llama(model: nn.Module, calibration: torch.Tensor) -> tuple[nn.Module, float | None]:
    """The smoothed copy of ``model`` whose int8 version is closest to it, and its alpha; or ``model`` itself and
    None when it has no Llama-shaped layers, no alpha beats plain int8, or smoothing would change its float outputs.
    ``calibration``: [n, seq] token ids from the training data."""
    layers = smoothable_layers(model)
    if not layers or len(calibration) == 0:
        return model, None
    model = model.eval()
    ranges = activation_ranges(model, calibration[:CALIBRATION_BLOCKS])
    # scored on other blocks than the ranges came from (on the same 8, alpha 0.8 won; on 32 others, 0.7)
    scored = calibration[CALIBRATION_BLOCKS : CALIBRATION_BLOCKS + SCORED_BLOCKS]
    if len(scored) == 0:
        scored = calibration[:SCORED_BLOCKS]
    reference = _log_probs(model, scored)
    best, best_alpha, best_kl = model, None, int8_kl(reference, model, scored)
    for alpha in ALPHAS:
        candidate = smoothed(model, ranges, alpha)
        if (kl := int8_kl(reference, candidate, scored)) < best_kl:
            best, best_alpha, best_kl = candidate, alpha, kl
    if best_alpha is not None:
        # the smoothed float model must be the same model, up to rounding
        if (reference - _log_probs(best, scored)).abs().max() > FLOAT_TOLERANCE:
            return model, None
    return best, best_alpha
