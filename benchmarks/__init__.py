"""Timing and memory tables for eqtrace's online rules against plain-JAX baselines."""
