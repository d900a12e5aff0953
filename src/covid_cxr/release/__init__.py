"""Packaging, the champion rule and the production record."""
