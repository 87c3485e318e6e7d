"""`python -m mathgrpo ...` (and `torchrun -m mathgrpo train ...`) run the CLI."""

import sys

from .cli import main

sys.exit(main())
