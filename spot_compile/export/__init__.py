"""A sparse model in the formats other runtimes serve: ONNX (`onnx`), written through torch's own exporter and
verified in ONNX Runtime before the file is written. May import `errors` and `serialization` (for safe file
writes); imported by `api` (`SparseViT.to_onnx`) and `cli`.
"""
