"""Adapters that implement the core's ports (storage, SQL, images, notifications)."""
