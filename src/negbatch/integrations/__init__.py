"""Integrations: see the modules of this package."""
