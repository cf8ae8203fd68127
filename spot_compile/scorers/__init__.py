"""Token scorers: the modules that fill the pruning pass's scoring slot, training-free (`training_free`) or learned
(`spot`, SPOT's predictors, with the fixed spatial `coverage_prior` they may add). May import `ops` and `errors`;
imported by `policies`, `serialization` and `calibration`.

A scorer is an `nn.Module` with `forward(tokens, *attention) -> scores (B, N)` and two attributes the pass reads:
  * `attention`: what the pass must tap from the preceding blocks: "none", "class" (class-token attention row,
    cheap for fused attention), "received" (mean attention received; forms the matrix) or "descriptor"
    (`ops.interaction_descriptor` per layer, from q/k);
  * `history`: how many preceding blocks to tap (never across an earlier prune point);
  * `positions` (optional, default False): if set, the pass also passes `positions=` (B, N, 1), each token's index
    among the input's patch tokens (-1 for special tokens), so a scorer can use where a token sits in the image.
"""
