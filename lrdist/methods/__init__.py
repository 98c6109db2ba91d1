"""Continual-learning strategies the sequential loop calls at fixed points."""
