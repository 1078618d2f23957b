"""`python -m robustwrap.cli`: the `robustwrap` command."""

import sys

from . import main

sys.exit(main())
