"""Alembic migration environment for the SQL adapter."""
