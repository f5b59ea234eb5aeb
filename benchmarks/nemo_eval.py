"""NeMo on the model organism: localize each memorized caption's neurons, switch them off, measure.

The steps and what each measures: ``diffmem/evaluate/localization_bench.py`` (this script's flow).

    .venv/bin/python benchmarks/nemo_eval.py [--model weights/diffmem-organism-v2] [--seeds 10]

Writes ``benchmarks/results/nemo_eval/results.json`` (+ ``neurons/``) and prints the summary; the same run
as ``diffmem bench localization``.
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("localization", description=__doc__.splitlines()[0]))
