"""What a sparsification decided: the stages, their token counts and the FLOPs before and after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Stage:
    block: int  # pruning happens in front of this block
    tokens_in: int
    tokens_out: int  # including special tokens (and the fused token)
    keep: int  # patch tokens kept (the static k of the prune op)


@dataclass
class SparsityPlan:
    policy: str
    budget: float
    stages: list[Stage]
    dense_flops: int
    sparse_flops: int
    input_shape: tuple[int, ...]

    @property
    def flops_ratio(self) -> float:
        return self.sparse_flops / self.dense_flops

    def to_dict(self) -> dict:
        return {**asdict(self), "flops_ratio": self.flops_ratio}
