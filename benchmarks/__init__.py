"""Measurements: each script times candidates against each other and writes what the book includes."""
