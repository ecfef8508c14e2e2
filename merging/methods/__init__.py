"""Merge methods: one registry of declared methods (see :mod:`merging.methods.base`)."""

from .base import MethodSpec, PerTensor, TensorJob, Threshold, all_specs, available, get_method, register

__all__ = ["MethodSpec", "PerTensor", "TensorJob", "Threshold", "all_specs", "available", "get_method", "register"]
