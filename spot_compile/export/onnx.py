"""A sparse model as an ONNX file, through torch's own exporter (`torch.onnx.export(..., dynamo=True)` on the
`torch.export` program), with a dynamic batch axis and the plan's static token counts, verified in ONNX Runtime
before the file is written.

The attention is lowered to its math form (`softmax(q kᵀ · scale + mask) v`) before the exporter runs: merging's
size bias is an SDPA mask, and the exporter's own lowering of a masked SDPA leaves a `view` on strides the lowered
attention does not produce (torch 2.14: "Cannot view a tensor with shape ... and strides ..."). The verification
runs the file in ONNX Runtime (CPU) on two batch sizes and compares every output with the PyTorch sparse model's;
a difference above the tolerance (relative to the outputs' scale) is an error and nothing is written. Needs the
`onnx` extra (`pip install 'spot-compile[onnx]'`: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from spot_compile.errors import ExportError, UsageError
from spot_compile.serialization.files import atomic_file, check_writable_file

EXTRA = ("onnx", "onnxscript", "onnxruntime")


@dataclass(frozen=True)
class OnnxExport:
    """What `to_onnx` wrote and how closely ONNX Runtime reproduced PyTorch: the largest absolute difference over
    every output and both batches, and that difference relative to the largest output magnitude (None where the
    policy draws its scores afresh every call, so that two runs are not comparable)."""

    path: Path
    batches: tuple[int, int]
    max_abs_diff: float | None
    relative_diff: float | None

    def describe(self) -> str:
        if self.max_abs_diff is None:
            return (f"ONNX written to {self.path}; ONNX Runtime ran it on batches {self.batches[0]} and {self.batches[1]} "
                    "(outputs not compared: the policy's scores are random on every call)")
        return (f"ONNX written to {self.path}; ONNX Runtime against PyTorch on batches {self.batches[0]} and "
                f"{self.batches[1]}: max |diff| {self.max_abs_diff:.2e}, relative {self.relative_diff:.2e}")


def require_onnx_extra() -> None:
    """A one-line UsageError naming the `pip install` when the exporter's packages are missing."""
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"ONNX export needs {', '.join(missing)}: pip install 'spot-compile[onnx]'")


def to_onnx(sparse, path: str | Path, *, batch: int = 2, tolerance: float = 1e-4, compare: bool = True) -> OnnxExport:
    """Writes `sparse` (a SparseViT) to `path` as ONNX (see the module docstring); `compare` False (a policy whose
    scores are random) runs the file without comparing its outputs."""
    require_onnx_extra()
    path = Path(path)
    check_writable_file(path, "the ONNX file")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UsageError(f"batch must be a whole number >= 1, got {batch!r}")
    program = sparse.export(batch).run_decompositions({torch.ops.aten.scaled_dot_product_attention.default: _math_attention})
    try:
        onnx_program = torch.onnx.export(program, (sparse.example(batch),), dynamo=True, verbose=False)
    except Exception as e:
        raise ExportError(f"torch.onnx could not export this model: {_first_line(e)}; export it with sparse.export() "
                          "(torch.export) instead, or report the op it names") from None
    # one protobuf: ViTs that fit 2 GB (a larger model would need ONNX's external data files)
    model_bytes = onnx_program.model_proto.SerializeToString()
    batches = (batch, batch + 1)
    diff, relative = _verify(sparse, model_bytes, batches, compare)
    if relative is not None and relative > tolerance:
        raise ExportError(f"the ONNX file's outputs differ from PyTorch's by {diff:.2e} (relative {relative:.2e}, above the "
                          f"tolerance {tolerance:g}); nothing was written: report it with the model and the policy")
    with atomic_file(path, "the ONNX file") as f:
        f.write(model_bytes)
    return OnnxExport(path, batches, diff, relative)


def _math_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as matmuls and a softmax (inference: no dropout); a causal or grouped-query SDPA is not a ViT's."""
    if is_causal or enable_gqa:
        raise ExportError("the model's attention is causal or grouped-query; the ONNX export handles a ViT's attention only")
    logits = q @ k.transpose(-2, -1) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(~attn_mask, float("-inf"))
    return logits.softmax(dim=-1) @ v


def _verify(sparse, model_bytes: bytes, batches: tuple[int, int], compare: bool) -> tuple[float | None, float | None]:
    import onnxruntime

    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst, scale = 0.0, 0.0
    for b in batches:
        x = sparse.example(b)
        got = session.run(None, {name: x.cpu().numpy()})
        with torch.no_grad():
            want = [t for t in torch.utils._pytree.tree_leaves(sparse(x)) if isinstance(t, torch.Tensor)]  # noqa: PLC2701
        if len(got) != len(want) or any(tuple(g.shape) != tuple(w.shape) for g, w in zip(got, want)):
            raise ExportError(f"the ONNX file gives outputs of shapes {[tuple(g.shape) for g in got]} at batch {b}, PyTorch "
                              f"{[tuple(w.shape) for w in want]}; nothing was written: report it with the model")
        for g, w in zip(got, want):
            w = w.detach().float().cpu()
            worst = max(worst, float((torch.from_numpy(g).float() - w).abs().max()))
            scale = max(scale, float(w.abs().max()))
    if not compare:
        return None, None
    return worst, worst / max(scale, 1e-12)


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    summary = next((line for line in lines if "Error" in line and "<class" in line), lines[0] if lines else type(e).__name__)
    return summary.strip()[:300]
