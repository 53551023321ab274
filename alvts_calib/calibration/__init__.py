"""`calibrate`: capture each layer's inputs, solve its selector and skip map, measure sensitivity, refine the split.

Writes a calibration (`artifact/`); uses the runtime to measure routed layers.
"""
