"""`python -m mixlora ...`: the same as the `mixlora` command."""

import sys

from mixlora.cli import main

sys.exit(main())
