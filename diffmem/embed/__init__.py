"""Image embedders behind one interface (SSCD, open_clip, pixel)."""
