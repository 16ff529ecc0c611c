"""Benchmarks (not tests): each prints a table and writes JSON (and PNG plots) to benchmarks/results/."""
