"""ONNX export of a classifier ([batch, features] → logits), a text encoder or classifier (input_ids and
attention_mask [batch, seq] → logits or embeddings) or a causal LM (input_ids [batch, seq] → logits),
dynamic int8 weight quantization of an ONNX file, and running one with onnxruntime on the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.errors import DistillError

ONNX_EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GiB: bigger models keep weights in model.onnx.data


class LogitsOnly(nn.Module):
    """An HF causal LM as input_ids → logits: no KV cache outputs, no attention mask (right padding is harmless)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path, *, lm: bool) -> Path:
    """Export with the dynamo exporter (the TorchScript one cannot export transformers' masking code, e.g.
    aten::diff); fall back to TorchScript for models torch.export cannot trace. ``example`` names the inputs, in the
    order ``model`` takes them; token inputs (integer, 2-d) get a dynamic batch and sequence, features a batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = (LogitsOnly(model) if lm else model).eval()
    names = list(example)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    tokens = {name: tensor.dim() == 2 and not tensor.is_floating_point() for name, tensor in example.items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    common = {"input_names": names, "output_names": ["logits"], "verbose": False}
    args = tuple(example.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dims = tuple({0: batch, 1: seq} if tokens[name] else {0: batch} for name in names)
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                dynamic_shapes=dims,
                external_data=weight_bytes > ONNX_EXTERNAL_DATA_BYTES,
                **common,
            )
        except Exception as dynamo_error:
            axes = {name: ({0: "batch", 1: "seq"} if tokens[name] else {0: "batch"}) for name in names}
            try:
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=False,
                    dynamic_axes={**axes, "logits": {0: "batch", 1: "seq"} if lm else {0: "batch"}},
                    **common,
                )
            except Exception as exc:
                raise DistillError(
                    f"cannot export {type(model).__name__} to ONNX: dynamo exporter: {_first_line(dynamo_error)}; "
                    f"TorchScript exporter: {_first_line(exc)}"
                ) from None
    return path


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def quantize_onnx_int8(src: Path, dst: Path) -> Path:
    """Int8 weights, activations quantized at run time (no calibration data needed)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # it logs a "consider pre-processing" warning on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return Path(dst)


def onnx_logits(path: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output on ``inputs`` (by input name), in onnxruntime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same CPU budget as the torch side
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]
