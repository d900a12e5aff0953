"""Retraining steps, the inbox, drift monitoring."""
