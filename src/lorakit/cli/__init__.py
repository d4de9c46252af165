"""The ``lorakit`` command line: one function per subcommand, each calling the library.

Each subcommand is a function in a module of this package, registered on ``app`` when
its module is imported, in the order ``lorakit --help`` lists them.
"""

from .base import app

from . import models  # noqa: E402,F401  inspect, plan
from . import runs  # noqa: E402,F401  train, train-image
from . import adapters  # noqa: E402,F401  combine, convert, compress, analyze, merge
from . import serving  # noqa: E402,F401  generate, serve

__all__ = ["app", "main"]


def main() -> None:
    app()
