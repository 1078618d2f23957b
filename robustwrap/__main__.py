"""`python -m robustwrap`: the `robustwrap` command, so that `torchrun -m robustwrap train ...` works."""

import sys

from .cli import main

sys.exit(main())
