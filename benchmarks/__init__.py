"""The product's maintained benchmarks: latency (`latency`, `policy_latency`, `predictor_cost`), accuracy against
FLOPs (`policies`, `merging`), model coverage (`model_coverage`), and what calibration costs (`data_path`,
`calibration_scaling`, `calibration_processes`), with the helpers every benchmark and study reports through
(`result_table`, `arguments`). Run them from the repository root as `python -m benchmarks.NAME`; each writes JSON
and a table to docs/results/.
"""
