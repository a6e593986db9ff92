"""Helpers shared by several test modules (imported as ``helpers.X``; tests/ is on pythonpath)."""
