"""Models: see the modules of this package."""
