"""`python -m quantbench ...` is the `quantbench` command."""
import sys

from quantbench.cli import main

sys.exit(main())
