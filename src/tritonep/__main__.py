"""`python -m tritonep`: the `tritonep` command (see `tritonep.cli`)."""

import sys

from .cli import main

sys.exit(main())
