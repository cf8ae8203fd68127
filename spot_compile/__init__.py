"""spot-compile: token pruning for Vision Transformers as a torch.fx compiler pass.

    import spot_compile
    sparse = spot_compile.sparsify(model, spot_compile.SparsifyConfig(budget=0.6))
    print(sparse.plan.flops_ratio)
    fast = sparse.compiled()
"""

from . import flops as _flops  # noqa: F401  (registers the CPU fused-attention FLOP formula)
from .api import SparseViT, sparsify
from .artifact import load, save
from .calibration import calibrate
from .config import SparsifyConfig
from .errors import SpotError

__all__ = ["SparseViT", "SparsifyConfig", "SpotError", "calibrate", "load", "save", "sparsify"]
__version__ = "0.1.0"
