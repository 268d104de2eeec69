"""Distillation methods. Each is a small class the shared loop (loop.py) drives."""
