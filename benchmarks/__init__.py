"""Benchmarks of mcdrop (not part of the installed package; run from the repository root)."""
