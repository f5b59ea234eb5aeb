"""SolidMark on the model organism: key its training set, fine-tune it on the keyed set, score every
verbatim-duplicated photo and a sample of the other images against chance, a shuffled-key null, a
freshly initialized UNet and the unkeyed organism; optionally before and after NeMo and adversarial
fine-tuning (the ``solidmark`` evaluation, :mod:`diffmem.evaluate.solidmark`; ``diffmem bench solidmark``).

Recipe (CPU, resumable at every stage; rerun the same command after an interruption)::

    python benchmarks/solidmark_eval.py                      # everything, defaults below
    python benchmarks/solidmark_eval.py --write-results      # also rewrite RESULTS.md's SolidMark section
    python benchmarks/solidmark_eval.py --nemo               # also localize the verbatim captions with NeMo
    python benchmarks/solidmark_eval.py --adversarial        # ... and adversarially fine-tune (implies --nemo)
    python benchmarks/solidmark_eval.py --smoke              # a minutes-long dry run on the tiny recipe

Stages (all under --workdir, the same as --out, default runs/solidmark-organism):

1. ``data``: the organism's training set (``diffmem organism data``), duplicates as separate rows,
   with its ``role`` and ``image_id`` columns.
2. ``keyed``: a SolidMark frame of --frame-width px (default 8 = 2 latent pixels of the organism's
   factor-4 autoencoder, as the paper's 16 px are 2 latent pixels of SD's factor 8) around every
   64-px image -> 80 px. Copies of one photo share one key (``--share-duplicate-keys``): with a fresh
   key per copy, 48 copies under one caption carry 48 different frames and no single key can be
   memorized (the paper's duplication study then needs "nearest key among copies", whose chance
   rate grows with the number of copies).
3. ``finetune``: the organism's UNet (and with --train-text-encoder its text encoder) fine-tuned on
   the keyed set; the VAE stays frozen.
   The keyed organism is saved to --out-model (default weights/diffmem-organism-v2-solidmark) with a
   model card.
4. ``score-*``: outpainting runs (DDIM, --score-steps, guidance 3, the training caption):
   keyed model, freshly initialized UNet, unkeyed organism; one copy of each distinct image.
5. ``nemo`` (optional): neurons of every verbatim caption on the keyed model (NeMo, statistics and
   threshold from the generic captions), the union switched off during a scoring run.
6. ``adversarial`` (optional): adversarial fine-tuning (``diffmem finetune --adversarial``'s library
   function) of the keyed model, the verbatim keyed photos as targets, surrogates made with the NeMo
   union off, generic keyed images as retain data; then the verbatim photos are scored again.

Results: ``WORKDIR/results.json`` and ``WORKDIR/results.md`` (the RESULTS.md section).
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("solidmark"))
