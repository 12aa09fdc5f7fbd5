"""``python -m vidattn.demo``: the same as ``vidattn demo``."""
import sys

from .options import main

sys.exit(main())
