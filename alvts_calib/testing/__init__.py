"""Test fixtures: tiny random-weight models of every family, an offline processor and the random demo model."""

from .selectors import weight_svd_selector

__all__ = ["weight_svd_selector"]
