"""`python -m spot_compile ...` is the `spot-compile` command (and what `torchrun -m spot_compile` starts)."""

from .cli import main

main()
