"""``python -m ardir``: the same as the ``ardir`` command (:func:`ardir.cli.main`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
