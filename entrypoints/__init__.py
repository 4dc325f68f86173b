"""Entry points: the composition root, the CLI and the library facade."""
