"""``python -m tpo_lite ...`` = the ``tpo-lite`` command (also where no console script is installed)."""
import sys

from tpo_lite.cli import main

sys.exit(main())
