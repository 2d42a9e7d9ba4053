"""The commands of ``aex``, one module per group; ``aex.cli`` registers them on its app."""
