"""Sub-commands of the ``vidattn`` CLI; each module defines ``register(subparsers)``."""
