"""``python -m tritonbn`` = the ``tritonbn`` command."""

import sys

from .cli import main

sys.exit(main())
