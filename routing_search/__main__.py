"""``python -m routing_search`` is the ``routing-search`` command."""

import sys

from .cli.main import main

sys.exit(main())
