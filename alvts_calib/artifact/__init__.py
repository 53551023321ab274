"""What calibration hands to the runtime: the runtime config, budgets, the calibration and selector files
(one schema), and `export`, which turns a calibration into a selector artifact.
"""
