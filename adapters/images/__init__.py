"""Image source adapters."""
