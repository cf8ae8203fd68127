"""What a model costs and how well it does: FLOPs (`flops`, torch's FlopCounterMode with CPU fused attention counted),
latency side by side (`timing`), and top-1 on labelled images (`accuracy`). May import `data` and `errors`;
imported by `api`, `calibration`, `cli` and the benchmarks.
"""
