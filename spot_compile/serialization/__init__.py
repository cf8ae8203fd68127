"""Files spot-compile writes and reads: `checkpoints` (every user-supplied file is read here, with
`weights_only=True`, and the fingerprints that tie a file to its model), `files` (writability checks before the slow
work, atomic writes), `predictors` (the calibrated predictor file), `artifact` (`save` / `load` of a sparsified
model). May import `graph`, `scorers`, `api` and `config`; imported by `policies`, `calibration` and `cli`.
"""
