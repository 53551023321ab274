"""The `alvts` command line: a thin shell over the alvts_calib library."""
