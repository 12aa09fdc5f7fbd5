"""Gradio demo: not implemented yet."""
