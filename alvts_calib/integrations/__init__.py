"""Integrations with other tools. Each imports its tool only when that tool loads it, so the core works without."""
