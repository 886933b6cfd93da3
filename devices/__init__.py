"""Simulated devices, device profiles and the demo."""
