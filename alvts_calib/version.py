"""The toolkit's version, stored in every artifact it writes."""

__version__ = "0.1.0"
