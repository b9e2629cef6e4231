"""`python -m crewdb`: the same as the `crewdb` command."""

import sys

from crewdb.cli import main

sys.exit(main())
