"""``python -m safecodec``: the command line (see :mod:`safecodec._cli`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._cli import main as _main

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``safecodec`` command line; return its exit status.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
