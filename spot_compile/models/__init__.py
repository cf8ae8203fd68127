"""The models spot-compile ships and builds in code: `vit`, a small ViT written for the tests and the demo (every
attention and block layout the block finder handles), and `zoo`, the ViTs trained here whose weights ship in
`assets/`. May import `data`, `serialization` and `errors`; imported by `cli`, the recipes, the tests.
"""
