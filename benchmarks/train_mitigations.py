"""Training-time mitigations at one budget on the duplicated-subset ground truth (issue #18's table).

Fine-tunes the organism on a set where ``--duplicated`` of ``--images`` images repeat ``--repeats`` times,
once per row (``none``, ``ambient``, ``wen-filter``, three ``caption-noise`` members, ``lora``, MemControl's mask),
at the same steps, batch, lr and seed, and measures each (diffmem.train.mitigation_study): replication of
the duplicated images, caption fidelity, first-step detection AUC, training time; MemControl's Pareto front
and its search cost. Resumable: rerun the same command.

    python benchmarks/train_mitigations.py --out runs/train_mitigations
    python benchmarks/train_mitigations.py --quick --out runs/train_mitigations_quick

It prints the markdown tables for benchmarks/RESULTS.md and writes them to ``OUT/table.md``;
the numbers go to ``benchmarks/results/train_mitigations.json``.
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("training-mitigations"))
