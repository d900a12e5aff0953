"""Scoring, metrics, reports and the gate."""
