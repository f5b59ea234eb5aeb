"""NeMo on the model organism: localize each memorized caption's neurons, switch them off, measure.

Steps (all seeds from the organism recipe; generation j of a caption starts from
``item_generator(recipe.seed, caption, j)`` as in ``diffmem.organism.evaluate``):

1. Value statistics and NeMo's threshold (mean + 1 std of the detection score) on the organism's
   generic captions (the non-memorized reference set).
2. ``NeMo.localize`` for every verbatim and template caption (one NeuronSet each, resumable).
3. Replication (own training image at SSIM >= the organism's replication threshold) and Wen et al.'s
   score over ``--seeds`` generations, before and with the caption's neurons off (weights scaled to 0).
4. The union of all found neurons off: held-out captions' images against the unedited ones (SSIM,
   median), and verbatim replication; the same with random neurons (same count per layer, seeded).
5. The guarded pipeline's mitigations (``"nemo"`` with the union, ``"embedding"``) on verbatim and
   held-out captions: replication, score, seconds added per flagged and per unflagged prompt.

    .venv/bin/python benchmarks/nemo_eval.py [--model weights/diffmem-organism-v2] [--seeds 10]

Writes ``benchmarks/results/nemo_eval/results.json`` (+ ``neurons/``) and prints the summary; the same run
as ``diffmem bench localization`` (the flow: ``diffmem/evaluate/localization_bench.py``).
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("localization", description=__doc__.splitlines()[0]))
