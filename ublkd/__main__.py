"""`python -m ublkd` is the `ublkd` command."""

import sys

from ublkd.cli import main

sys.exit(main())
