"""`python -m quantbench ...` is the `quantbench` command."""
import sys

from quantbench.cli import main

if __name__ == "__main__":  # an experiment's process imports this module as __mp_main__, and must not run it
    sys.exit(main())
