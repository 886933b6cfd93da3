"""Uplinks: one interface (base.py), one module per cloud."""
