"""``python -m solver`` and the ``solver`` console script: the command line (see
:mod:`solver.cli`).

A ``solver`` process imports the command line with the cyclic garbage collector
off, then freezes what the import made (``gc.freeze``): the ~35,000 objects of
the modules live until the process exits, and each collection during the import
and the build walked them again. It saves about 11 % of a no-op build's
instructions (``docs/performance.md``, "CLI start-up"). Only the program does
this: a program that imports :mod:`solver.cli` keeps its collector as it was.
"""

import gc
import sys

_collecting = gc.isenabled()
gc.disable()
try:
    from .cli import main
finally:
    if _collecting:
        gc.enable()
gc.freeze()


def run() -> None:
    """The console script's entry point: run the command line, exit with its status."""
    sys.exit(main())


if __name__ == "__main__":
    run()
