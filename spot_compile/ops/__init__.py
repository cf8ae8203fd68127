"""The traceable token ops that the passes splice into a graph: plain torch functions (no spot-compile imports), so
that Inductor can fuse them and `torch.export` traces through them. `tokens` selects and orders tokens, `attention`
forms the attention summaries the scorers read and the masked attention of the calibration graph, `merging` is
ToMe's bipartite matching and proportional attention. Anything may import this package; it imports nothing of ours.

Shapes: `tokens` is (B, N, D); attention probabilities are (B, H, N, N) or (B*H, N, N); q/k are (..., N, d).
Scores are (B, N): one relevance value per token, higher means keep.
"""

from spot_compile.ops.attention import (
    attention_probs,
    attention_received,
    class_attention_probs,
    class_attention_qk,
    descriptor_from_logits,
    interaction_descriptor,
    masked_attention,
    masked_attention_probs,
    masked_softmax,
)
from spot_compile.ops.merging import key_metric, merge_destinations, merge_tokens, size_bias
from spot_compile.ops.tokens import kept_indices, kept_patch_indices, prune_tokens, scale_by_keep, token_positions

__all__ = [
    "attention_probs", "attention_received", "class_attention_probs", "class_attention_qk", "descriptor_from_logits",
    "interaction_descriptor", "kept_indices", "kept_patch_indices", "key_metric", "masked_attention",
    "masked_attention_probs", "masked_softmax", "merge_destinations", "merge_tokens", "prune_tokens", "scale_by_keep", "size_bias",
    "token_positions",
]
