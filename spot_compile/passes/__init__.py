"""Every rewrite of a captured graph, each a `torch.fx` `PassBase` run by `pipeline.run_passes`: a policy's stage
(`insert_pruning` for dropping and fusing, `insert_merging` for merging), the calibration graph (`soft_pruning`),
capture's clean-up (`trivial_masks`), with the helpers they share: `emit` (inserting tagged nodes), `taps`
(attention summaries and token positions a scorer reads), `propagate_tokens` (re-deriving shapes downstream of a
reduced token count). May import `graph`, `ops` and `errors`; imported by `policies`, `planning`, `calibration`.
"""
