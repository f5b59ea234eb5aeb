"""The model organism: generated data, training recipe and measured ground truth."""
