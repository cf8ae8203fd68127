"""The calibration loss, term by term: each step's terms come back as a dict, so that the log, the table and the
loss itself read the same numbers.

Loss = cross-entropy on labels + `logit_distill` * KL(dense teacher || sparse student) on logits
       + `token_distill` * MSE(surviving tokens, the dense model's tokens at the same positions), after the last
         block, each token layer-normalised (DynamicViT's token distillation; scale-free, whatever the stream's norm)
       + `keep_ratio` * sum over stages of (mean keep probability - stage target)^2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from spot_compile.calibration.config import LossWeights
from spot_compile.passes.soft_pruning import SoftKeep, kept_positions

TERMS = ("loss", "ce", "kl", "tok", "ratio")


def calibration_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, weights: LossWeights, *,
                     keep_ratios: Sequence[tuple[torch.Tensor, float]] = (),
                     tokens: tuple[torch.Tensor, torch.Tensor, list[SoftKeep], int] | None = None) -> dict[str, torch.Tensor]:
    """The loss and its terms (`TERMS`). `teacher`: the dense model's logits (None without distillation);
    `keep_ratios`: (soft keep ratio (B,), target) per stage, none for a graph with static counts and no soft mask;
    `tokens`: (student tokens, teacher tokens, the stages' SoftKeeps, special token count) for the token loss."""
    zero = torch.zeros((), device=logits.device)
    ce = F.cross_entropy(logits, labels)
    kl = (F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
          if weights.logit_distill else zero)
    ratio = sum((soft.mean() - target) ** 2 for soft, target in keep_ratios) if keep_ratios else zero
    tok = token_loss(*tokens) if weights.token_distill and tokens is not None else zero
    loss = ce + weights.logit_distill * kl + weights.token_distill * tok + weights.keep_ratio * ratio
    return {"loss": loss, "ce": ce, "kl": kl, "tok": tok, "ratio": ratio}


def token_loss(student: torch.Tensor, teacher: torch.Tensor, keepers: list[SoftKeep], num_special: int) -> torch.Tensor:
    """MSE between the student's surviving patch tokens and the teacher's tokens at the same image positions,
    both layer-normalised without affine (the residual stream's scale is the model's business, not the loss's)."""
    pos = kept_positions(keepers, teacher.shape[1] - num_special).to(student.device)
    teacher = teacher[:, num_special:]
    dim = teacher.shape[-1]
    target = teacher.gather(1, pos.expand(teacher.shape[0], -1).unsqueeze(-1).expand(-1, -1, dim))
    return F.mse_loss(F.layer_norm(student[:, num_special:], (dim,)), F.layer_norm(target, (dim,)))
