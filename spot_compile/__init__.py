"""spot-compile: token reduction for Vision Transformers as a torch.export / torch.fx compiler pass.

    import spot_compile
    sparse = spot_compile.sparsify(model, spot_compile.SparsifyConfig(budget=0.6))
    print(sparse.plan.flops_ratio)
    fast = sparse.compiled()
"""

from spot_compile.api import SparseViT, sparsify
from spot_compile.calibration.config import CalibrationConfig
from spot_compile.calibration.trainer import calibrate
from spot_compile.config import SparsifyConfig
from spot_compile.errors import SpotError
from spot_compile.measure import flops as _flops  # noqa: F401  (registers the CPU fused-attention FLOP formula)
from spot_compile.serialization.artifact import load, save

__all__ = ["CalibrationConfig", "SparseViT", "SparsifyConfig", "SpotError", "calibrate", "load", "save", "sparsify"]
__version__ = "0.1.0"
