"""Evaluation on the model organism: no mitigation / NeMo / subspace pruning / adversarial fine-tuning, each attacked by Dori.

A table like the Finding Dori paper's: for the organism's verbatim-memorized photographs, the SSIM of
generations to the training image (mean ± std over targets; per target the mean over seeds) and the
memorization rate (fraction of targets whose mean SSIM exceeds ``--threshold``), from the caption and
from the Dori trigger; held-out quality as the median SSIM of held-out-caption generations to the
unedited model's (same seeds) and as caption fidelity (the fraction whose colour and shape a
classifier, ``diffmem.organism.fidelity``, reads as the ones named); the false-positive control (the
attack on images the model never saw).

Stages are cached as JSON in ``--out`` (rerun to resume after an interruption):

    python benchmarks/dori_eval.py --model weights/diffmem-organism-v2 --out runs/dori_eval
    python benchmarks/dori_eval.py --quick ...     # fewer targets and seeds, shorter fine-tuning

It prints the markdown table for benchmarks/RESULTS.md and writes it to ``OUT/table.md``; the same run as
``diffmem bench robustness`` (the flow: ``diffmem/evaluate/robustness_bench.py``).
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("robustness", description=__doc__.splitlines()[0]))
