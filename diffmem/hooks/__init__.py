"""The one mechanism that reads or changes activations; every context manager restores the model."""
