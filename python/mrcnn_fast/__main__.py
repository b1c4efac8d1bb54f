"""`python -m mrcnn_fast ...` is the `mrcnn-fast` command (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
