"""Measured ground truth of the model organism (``weights/diffmem-organism-v2``, or ``--model`` any organism).

What it generates and measures: ``diffmem/evaluate/organism_bench.py`` (this script's flow).

Writes ``<out>/results.json``, ``generations.jsonl``, ``images.npz``, ``ssim_histogram.png`` and
prints the markdown for ``benchmarks/RESULTS.md``. ``--write-calibration`` stores the first-step
flag threshold in the model folder (``diffmem_calibration.json``), which ``diffmem demo`` uses.

    python benchmarks/organism_eval.py --write-calibration

The same run as ``diffmem bench organism``.
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("organism", description=__doc__.splitlines()[0]))
