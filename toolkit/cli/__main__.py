"""`python -m toolkit.cli ...`, as the console script."""

from . import main

main()
