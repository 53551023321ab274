"""The selector's math: attention importance, the low-rank layer selector, its solver and the fitted skip maps.

Pure tensor code over one layer's inputs; imports `model/` and the base modules only.
"""
