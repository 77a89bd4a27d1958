"""``python -m fastrlhf ...`` = the ``fastrlhf`` command."""
import sys

from fastrlhf.cli import main

sys.exit(main())
