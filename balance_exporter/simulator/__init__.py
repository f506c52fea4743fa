"""A stand-in for Gemini's private REST API that enforces its rules: signatures, nonces, rate
limits, master and account keys. Tests and the demo run against it; the exporter never imports it.
"""
