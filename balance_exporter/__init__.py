"""Prometheus exporter for the balances of Gemini exchange accounts."""

__version__ = "0.1.0"
