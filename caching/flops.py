"""FLOP formulas torch's FlopCounterMode lacks: quantized linear layers.

`torch.utils.flop_counter` counts aten ops only, so a transformer quantized with torch's dynamic
int8 (`torch.ao.quantization.quantize_dynamic`, whose Linear calls `quantized::linear_dynamic`)
counts zero FLOPs and every cache statistic reads 0. A quantized matrix product does the same
multiply-adds as the float one: 2 x (rows of the input) x in_features x out_features, read off
the input and output shapes. Importing this module registers the formulas once, process-wide.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

_QUANTIZED_LINEARS = ("linear_dynamic", "linear_dynamic_fp16", "linear_relu_dynamic", "linear_relu_dynamic_fp16")


def quantized_linear_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    """2 * M * K * N for an input (..., K) and an output (..., N)."""
    return 2 * math.prod(input_shape[:-1]) * input_shape[-1] * out_shape[-1]


def _register() -> list[str]:
    registered = []
    ops = getattr(torch.ops, "quantized", None)
    for name in _QUANTIZED_LINEARS:
        try:
            packet = getattr(ops, name)
        except (AttributeError, RuntimeError):  # a torch build without quantized kernels
            continue
        try:
            register_flop_formula(packet)(quantized_linear_flops)
        except (RuntimeError, ValueError):  # already registered (module reloaded)
            continue
        registered.append(name)
    return registered


REGISTERED = _register()
