"""Localization of memorization: NeMo value neurons, subspace pruning of FFN weights."""
