"""``python -m fastrlhf ...`` = the ``fastrlhf`` command."""
import sys

from fastrlhf.tools.cli import main

sys.exit(main())
