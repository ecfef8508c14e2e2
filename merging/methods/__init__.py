"""Merge methods: one registry of declared methods (see :mod:`merging.methods.base`)."""

from .base import MethodSpec, TensorJob, all_specs, available, get_method, register

__all__ = ["MethodSpec", "TensorJob", "all_specs", "available", "get_method", "register"]
