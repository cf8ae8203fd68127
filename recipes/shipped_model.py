"""The shipped Fashion-MNIST ViT as a model file for the CLI, e.g.

    spot-compile calibrate recipes/shipped_model.py --data /usr/share/datasets/fashion-mnist --budget 0.6 --out p.pt
"""

from spot_compile.models.zoo import load_shipped_model

model, _metrics = load_shipped_model()
