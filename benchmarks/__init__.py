"""Benchmarks and tuning runs (see the README's Benchmarks section)."""
