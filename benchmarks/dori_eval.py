"""Evaluation on the model organism: no mitigation / NeMo / subspace pruning / adversarial fine-tuning, each attacked by Dori.

What each column measures: ``diffmem/evaluate/robustness_bench.py`` (this script's flow).

Stages are cached as JSON in ``--out`` (rerun to resume after an interruption):

    python benchmarks/dori_eval.py --model weights/diffmem-organism-v2 --out runs/dori_eval
    python benchmarks/dori_eval.py --quick ...     # fewer targets and seeds, shorter fine-tuning

It prints the markdown table for benchmarks/RESULTS.md and writes it to ``OUT/table.md``; the same run as
``diffmem bench robustness``.
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("robustness", description=__doc__.splitlines()[0]))
