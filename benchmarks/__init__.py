"""Benchmarks: each ``python -m benchmarks.<name> --json`` prints one JSON object."""
