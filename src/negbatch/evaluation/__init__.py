"""Evaluation: see the modules of this package."""
