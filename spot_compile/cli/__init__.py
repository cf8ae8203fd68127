"""The `spot-compile` command line, a thin layer over the Python API: `main` (the commands and their options) and the
helpers only the commands use: `options` (options several commands share), `bench` (latency tables), `demo` (the
built-in default run), `report` (tables and `--dump`), `visualize` (PNG pictures), `userfile` (running a user's
model file). May import anything in the package; nothing in the package imports it.
"""

from spot_compile.cli.main import main

__all__ = ["main"]
