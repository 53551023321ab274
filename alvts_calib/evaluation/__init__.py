"""The evaluation harness and the reference methods (FastV, PyramidDrop, DART, oracle, random) it compares.

Not part of the product: nothing in model/, selector/, artifact/, runtime/ or calibration/ imports it.
"""
