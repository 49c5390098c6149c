"""Placeholder: the full preset's extra apps."""
REGISTRY = {}
