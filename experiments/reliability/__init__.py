"""Fault-injection scenario (issue 14): figures in results.json."""
