"""Benchmarks: python -m bench [--quick]."""
