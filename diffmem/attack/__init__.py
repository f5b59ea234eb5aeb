"""Adversarial embedding search (Finding Dori) against any model or edited model."""
