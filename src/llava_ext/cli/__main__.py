"""`python -m llava_ext.cli ...`, as `torchrun -m` and `accelerate launch -m` start the CLI."""

from . import main

__all__ = []

if __name__ == "__main__":
    raise SystemExit(main())
