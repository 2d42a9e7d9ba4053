"""Checkpoints on disk: self-describing safetensors files, the torch-free header reader and discovery, the reference importer."""
