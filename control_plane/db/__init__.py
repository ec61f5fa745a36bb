"""Persistence: SQLAlchemy 2 (async) models and the engine factory."""
