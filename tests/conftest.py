"""Shared pytest configuration. pytest-trio runs every async test (trio_mode in pyproject)."""
