"""`python -m spot_compile ...` is the `spot-compile` command; torchrun starts it so:
`torchrun --nproc-per-node N -m spot_compile calibrate ...`."""

from spot_compile.cli.main import main

if __name__ == "__main__":
    main()
