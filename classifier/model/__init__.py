"""The models: backbones and heads, their training, and where they compute (devices, precision)."""
