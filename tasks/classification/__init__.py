"""Sequence classification: listops.py (the generator), task.py (the runner and its sources)."""
