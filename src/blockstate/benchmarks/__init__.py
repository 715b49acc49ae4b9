"""Benchmarks: speed and memory measured side by side in one run, printed as tables and saved as JSON/PNG."""
