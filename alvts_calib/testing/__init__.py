"""Test fixtures: tiny random-weight models of every family, an offline processor and the random demo model."""
