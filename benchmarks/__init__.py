"""Benchmarks: scripts that time the pipeline and print tables (docs/development.md)."""
