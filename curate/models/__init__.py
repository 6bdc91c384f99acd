"""Model loading (open_clip) and checkpoint formats."""
