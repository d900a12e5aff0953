"""Data in: decoding, checks, import, split, validation."""
