"""Updating: the decisions about fetching, fitting and activating new versions."""
