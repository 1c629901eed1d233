"""``python -m fmjax.cli``: the ``fmjax`` command."""

import sys

from fmjax.cli.main import main

sys.exit(main())
