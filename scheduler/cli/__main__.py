"""``python -m tessera.scheduler.cli``: the ``tessera`` command."""

import sys

from tessera.scheduler.cli import main

sys.exit(main())
