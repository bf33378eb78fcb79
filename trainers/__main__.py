"""``python -m entropy_ops.trainers train ...``: the same as the ``entropy-ops`` command."""
import sys

from .cli import main

sys.exit(main())
