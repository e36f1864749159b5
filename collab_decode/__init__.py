"""collab-decode: small-large collaborative decoding."""

__version__ = "0.1.0"
