"""Gradio building blocks and plotly figure builders. Thin: every real computation is in ``merging``."""
