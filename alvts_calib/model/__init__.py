"""The model side: family adapters, visual positions, devices, fingerprints, loading and a layer's own attention.

Imports nothing from the rest of the package but `errors`, `options` and `progress`.
"""
