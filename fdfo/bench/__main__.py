"""`python -m fdfo.bench`: see fdfo/bench/__init__.py."""

from fdfo.bench.cli import main
from fdfo.cli import run_main

run_main(main, None)
