"""``python -m shear`` (and ``torchrun -m shear ...``): the ``shear`` command."""

import sys

from shear.cli import main

if __name__ == "__main__":
    sys.exit(main())
