"""The GGUF block-quantization grids (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) in torch, for quantization-aware distillation.

``project`` rounds a weight to the nearest value a GGUF type can hold, bit for bit what gguf-py's
``dequantize(quantize(w))`` gives (the same float32 arithmetic in the same order), so a student trained through
``fake_quant`` sees in its forward pass exactly the weights that ``distill export --format gguf-<type>`` writes.
``attach`` puts a Llama-style model's matrices on the grid with ``torch.nn.utils.parametrize``; ``detach`` leaves the
projected values as plain weights, which the export packs again without change (``project`` is idempotent).

Rows are cut into blocks of 32 values along the last dimension; each block keeps a float16 scale (and for the _1
types a float16 minimum) and a 4-, 5- or 8-bit code per value. Codes are computed with the float32 scale, values are
rebuilt from the float16 one, as in gguf-py and llama.cpp's reference ``quantize_row_*_ref``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from distill.errors import DistillError

QTYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
BLOCK = 32
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}  # per block of 32 values in the file
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING_TYPE = "q8_0"
# Blocks rounded at a time (512 Ki values, 2 MiB in float32): each of the dozen elementwise steps then runs in cache
# on a buffer it reuses, instead of allocating and streaming a full-size tensor through memory per step.
CHUNK_BLOCKS = 16_384


def project(weight: Tensor, qtype: str) -> Tensor:
    """``weight`` rounded to the nearest value of the GGUF type ``qtype`` along its last dimension, in float32.

    Bit for bit ``gguf.quants.dequantize(gguf.quants.quantize(w, T), T)`` for float32 ``w``. Other dtypes are read as
    float32 and the result stays float32 (bf16 cannot hold the grid: a q4_0 value is a float16 scale times a code).
    No gradient flows through the result; ``fake_quant`` is the differentiable form. Exactness relies on eager
    elementwise ops (one IEEE rounding each): a compiler that fuses ``x * id + c`` into an FMA may move a code.
    """
    if qtype not in QTYPES:
        raise DistillError(f"unknown GGUF grid {qtype!r}: use one of {', '.join(QTYPES)}")
    if weight.ndim == 0 or weight.shape[-1] % BLOCK:
        raise DistillError(
            f"cannot round a tensor of shape {tuple(weight.shape)} to {qtype}: rows must be a multiple of 32 values"
        )
    x = weight.detach().to(torch.float32).reshape(-1, BLOCK)
    out = torch.empty_like(x)
    for start in range(0, len(x), CHUNK_BLOCKS):
        rows = slice(start, start + CHUNK_BLOCKS)
        _project_blocks(x[rows], qtype, out[rows])
    return out.reshape(weight.shape)


def _project_blocks(x: Tensor, qtype: str, out: Tensor) -> None:
    """``x``'s blocks (rows of 32) on the grid, written into ``out``: gguf-py's steps in its order, in place."""
    if qtype == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        _round_half_away(torch.mul(x, _inverse(d), out=out))
        _integer(out).mul_(_half(d))
    elif qtype in ("q4_0", "q5_0"):
        mid = 8 if qtype == "q4_0" else 16
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # signed; the first on a tie of |max|, as numpy
        d = peak / -mid  # the peak gets code 0, so the grid reaches -mid*d exactly on the peak's side
        _integer(torch.mul(x, _inverse(d), out=out).add_(mid + 0.5).trunc_()).clamp_(0, 2 * mid - 1)
        out.sub_(mid).mul_(_half(d))
    else:
        top = 15 if qtype == "q4_1" else 31
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / top
        _integer(torch.sub(x, lo, out=out).mul_(_inverse(d)).add_(0.5).trunc_()).clamp_(0, top)
        out.mul_(_half(d)).add_(_half(lo))


def _inverse(d: Tensor) -> Tensor:
    # A true division (``1 / d`` on a tensor is reciprocal(d) * 1, which a backend may approximate); 0 where d == 0.
    return torch.where(d == 0, 0.0, torch.ones_like(d) / d)


def _half(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)


def _round_half_away(x: Tensor) -> Tensor:
    """gguf-py's ``np_roundf`` (C's roundf), step for step, in place: torch.round would round halves to even."""
    a = x.abs()
    floored = torch.floor(a)
    a.sub_(floored).mul_(2).floor_().add_(floored)  # floored + floor(2 * (a - floored))
    return x.sign_().mul_(a)


def _integer(q: Tensor) -> Tensor:
    """Codes as gguf-py's cast to an integer type leaves them, in place: no negative zero, and a non-finite value (a
    block whose scale is below float32's normal range, so 1/d overflows) becomes 0, as numpy's cast does on x86."""
    return torch.nan_to_num_(q, nan=0.0, posinf=0.0, neginf=0.0).add_(0.0)


class _RoundThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, qtype: str) -> Tensor:
        return project(weight, qtype).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def fake_quant(weight: Tensor, qtype: str) -> Tensor:
    """Straight-through estimator: the forward value is ``project(weight)`` (in ``weight``'s dtype), the gradient
    is the identity. An autograd Function rather than ``w + (project(w) - w).detach()``, whose float sum can miss
    the grid value by an ulp (or the sign of a zero), so the forward pass is exactly what the export writes."""
    return _RoundThrough.apply(weight, qtype)


def grid_types(model: nn.Module, qtype: str) -> dict[str, str]:
    """State-dict name -> GGUF type for every weight QAD puts on the grid, for a Llama-style HF model (names as the
    plain model has them, also while ``attach``'s parametrizations are on).

    The block linears (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) go to ``qtype``. The token
    embedding, and the LM head when it is not tied to it, go to q8_0: they are read at every token for the logits,
    rounding them to 4 bits costs the most, and llama.cpp's own quantize keeps the output matrix at a higher type
    too. A tied head is the embedding's tensor: listed once, under the embedding's name. Norms and other 1-D
    tensors are not listed; they stay float32.
    """
    if qtype not in QTYPES:
        raise DistillError(f"unknown GGUF grid {qtype!r}: use one of {', '.join(QTYPES)}")
    embedding, head = _embedding_and_head(model)
    types = {}
    for name, param in _named_weights(model):  # a tied weight once, under its first (the embedding's) name
        if param is embedding or param is head:
            types[name] = EMBEDDING_TYPE
        elif param.ndim == 2 and name.split(".")[-2] in QUANTIZED_LINEARS:
            types[name] = qtype
    return types


def quantizable(model: nn.Module, qtype: str) -> list[str]:
    """The names of the weights ``attach`` puts on the grid (the keys of ``grid_types``)."""
    return list(grid_types(model, qtype))


def check_rows(model: nn.Module, qtype: str) -> None:
    """DistillError naming the first grid weight whose rows are not a multiple of 32 values."""
    params = dict(_named_weights(model))
    for name, gtype in grid_types(model, qtype).items():
        shape = tuple(params[name].shape)
        if shape[-1] % BLOCK:
            raise DistillError(
                f"{name} has shape {shape}: GGUF {gtype} rounds rows in blocks of 32 values, so its rows must be a "
                "multiple of 32 values"
            )


class OnGrid(nn.Module):
    """The parametrization ``attach`` registers: the weight the model sees is ``fake_quant(original, qtype)``."""

    def __init__(self, qtype: str):
        super().__init__()
        self.qtype = qtype

    def forward(self, weight: Tensor) -> Tensor:
        return fake_quant(weight, self.qtype)

    def extra_repr(self) -> str:
        return self.qtype


def attach(model: nn.Module, qtype: str) -> nn.Module:
    """Put ``model``'s ``grid_types`` weights on their grids with parametrizations, in place; returns ``model``.

    The trainable parameter stays the float32 original (``<module>.parametrizations.weight.original``); every
    forward reads it through ``fake_quant``. A tied head keeps holding the embedding's Parameter: it gets its own
    parametrization over that same original, so both ends see the same projected matrix and the gradient of both
    reaches the one Parameter, as in the untouched tied model.
    """
    if any(isinstance(m, OnGrid) for m in model.modules()):
        raise DistillError("this model is already on a GGUF grid (attach was called): detach it first")
    check_rows(model, qtype)
    embedding, head = _embedding_and_head(model)
    tied_head = model.get_output_embeddings() if head is not None and head is embedding else None
    modules = dict(model.named_modules())
    for name, gtype in grid_types(model, qtype).items():
        module_name, _, tensor_name = name.rpartition(".")
        parametrize.register_parametrization(modules[module_name], tensor_name, OnGrid(gtype))
    if tied_head is not None:
        parametrize.register_parametrization(tied_head, "weight", OnGrid(EMBEDDING_TYPE))
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove ``attach``'s parametrizations, in place, leaving the projected grid values as the plain weights (the
    same Parameter objects, so an optimizer's references stay valid and a tied head stays tied); returns ``model``."""
    projected = set()  # originals already set to their grid values: a tied head's original is the embedding's
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in list(module.parametrizations.items()):
            if not all(isinstance(p, OnGrid) for p in chain):
                continue
            original = chain.original
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=id(original) not in projected)
            projected.add(id(original))
    return model


def rounded(model: nn.Module, qtype: str) -> nn.Module:
    """A copy of ``model`` with its weights as a GGUF of ``qtype`` holds them: on its grid (``attach``, then
    ``detach``), or for ``f16`` its matrices rounded to float16. What llama.cpp's quantize does for these types
    without an importance matrix, i.e. rounding after training."""
    model = copy.deepcopy(model)
    if qtype != "f16":
        return detach(attach(model, qtype))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 1:
                parameter.copy_(parameter.half().float())
    return model


def file_bytes(model: nn.Module, qtype: str) -> int:
    """Bytes of tensor data in a GGUF export of ``model`` at ``qtype`` (a grid type, or ``f16``): grid weights in
    their block types, 1-D tensors in F32, any other matrix (or a q8_0 matrix whose rows q8_0 cannot pack) in F16; a
    tied head once. Metadata, the tokenizer and alignment padding are not counted."""
    types = {} if qtype == "f16" else grid_types(model, qtype)
    total = 0
    for name, param in _named_weights(model):  # a tied head is the embedding's Parameter: yielded once
        n = param.numel()
        if name in types and param.shape[-1] % BLOCK == 0:
            total += n // BLOCK * BLOCK_BYTES[types[name]]
        else:
            total += 4 * n if param.ndim <= 1 else 2 * n
    return total


def _named_weights(model: nn.Module):
    """``named_parameters()`` under the plain model's names: ``attach`` keeps a weight ``x.weight`` as
    ``x.parametrizations.weight.original``."""
    for name, param in model.named_parameters():
        yield name.replace(".parametrizations.", ".").removesuffix(".original"), param


def _embedding_and_head(model: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    """The Parameters of the token embedding and the LM head (the originals under a parametrization)."""

    def weight(module: nn.Module | None) -> Tensor | None:
        if module is None:
            return None
        if parametrize.is_parametrized(module, "weight"):
            return module.parametrizations.weight.original
        return module.weight

    return weight(model.get_input_embeddings()), weight(model.get_output_embeddings())
