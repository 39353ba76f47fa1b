"""The pipeline's stages and the modules they share (see README.md)."""
