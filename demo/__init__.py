"""vidattn's Gradio demo (``vidattn demo`` or ``python -m vidattn.demo``; gradio comes with the ``demo`` extra).

Importing this package loads neither gradio nor torch: :func:`vidattn.demo.app.build_app` builds the page,
:mod:`vidattn.demo.options` declares the command-line options and launches it.
"""
