"""`python -m rflav_cli …` (also what `torchrun -m rflav_cli` runs)."""

from .cli import main

main()
