"""Merge Lab's library: merging fine-tuned experts of one base, and measuring why a merge works.

Data flows ExpertSet → Layout → TaskVectors → ImportanceMap → Recipe → merge engine →
merged model → probe report / export. This package never imports gradio or plotly.
"""

from . import methods
from .engine import MergeEngine, MergeResult, MergeSettings, merge_state_dicts
from .errors import MergeLabError
from .io.experts import ExpertSet
from .io.layout import Layout

__all__ = ["ExpertSet", "Layout", "MergeEngine", "MergeLabError", "MergeResult", "MergeSettings",
           "merge_state_dicts", "methods"]
