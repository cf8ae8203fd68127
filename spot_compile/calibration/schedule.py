"""The learning-rate schedule of a calibration: linear warm-up, then cosine decay to zero.
"""

from __future__ import annotations

import math


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
