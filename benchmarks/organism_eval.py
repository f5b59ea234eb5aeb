"""Measured ground truth of the model organism (``weights/diffmem-organism-v2``, or ``--model`` any organism).

Generates every verbatim, template, held-out and generic caption with ``--seeds`` seeds through the
guarded pipeline, and measures:

* replication: SSIM (at 64 px) of each generation to its nearest training image
  (``diffmem.organism.replication``), per caption role, with the histogram of the populations;
* detection: Wen et al.'s score over the first step, the first 10 steps and all steps, AUC and TPR
  at 1 % FPR of verbatim (and, separately, template and generic) captions against held-out ones.

Writes ``<out>/results.json``, ``generations.jsonl``, ``images.npz``, ``ssim_histogram.png`` and
prints the markdown for ``benchmarks/RESULTS.md``. ``--write-calibration`` stores the first-step
flag threshold in the model folder (``diffmem_calibration.json``), which ``diffmem demo`` uses.

    python benchmarks/organism_eval.py --write-calibration

The same run as ``diffmem bench organism`` (the flow: ``diffmem/evaluate/organism_bench.py``).
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("organism", description=__doc__.splitlines()[0]))
