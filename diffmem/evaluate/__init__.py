"""Evaluation as library code: suites of labelled prompts, the detection and mitigation evaluators, metrics.

``diffmem bench``, the ``benchmarks/`` scripts and the CLI share these flows.
"""
