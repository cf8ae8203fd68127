"""FLOPs measured by `torch.utils.flop_counter.FlopCounterMode`, with CPU fused attention counted.

On CPU, SDPA dispatches to `aten._scaled_dot_product_flash_attention_for_cpu`, which torch's counter has no formula
for, so it would count attention as free. We register torch's own SDPA formula for it (`sdpa_flop_count`), so
the count matches what the MATH backend's matmuls read. On other devices the fused kernel SDPA picks (flash,
memory-efficient, cuDNN) depends on the build and the card, so there attention is counted under the MATH backend,
whose matmuls every build counts: the FLOPs ratio is then the same on every device (0.598 for DeiT-S at budget 0.6
on the CPU and on an H100).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

if _cpu_flash not in flop_registry and _cpu_flash.default not in flop_registry:

    @register_flop_formula(_cpu_flash, get_raw=True)
    def _cpu_flash_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)


@torch.no_grad()
def count_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs (2 per multiply-add) of one forward pass of `model` on `example`."""
    math_attention = sdpa_kernel(SDPBackend.MATH) if example.device.type != "cpu" else contextlib.nullcontext()
    with math_attention, FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())
