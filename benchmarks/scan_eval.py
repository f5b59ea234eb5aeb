"""Dataset-wide scan of the model organism: does the scan find the verbatim-memorized captions?

The organism's training set (``diffmem organism data``) is scanned as any user dataset would be: one
row per training sample (duplicates included), labels ``memorized = (role == "verbatim")``. Two scans:

* full: first-step score of every distinct caption, ``--num-gens`` generations each, nearest training
  image (pixel descriptor), Carlini's tiled-L2 cliques;
* two-stage (Webster-style): the same first-step scores, generation only for the ``--top-fraction``
  highest-scoring captions (the score shards are reused from the full scan, which is exactly what
  the two-stage scan would compute).

Reported: precision/recall of the per-caption flags at the embedder's thresholds, Somepalli et al.'s
dataset summary and background, max similarity by caption role, and for the two-stage scan the share of
generation it saves and the captions it misses. Writes ``<work>/scan_eval.json``.

    .venv/bin/python benchmarks/scan_eval.py --work runs/scan_eval
"""

from diffmem.commands.bench import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("scan"))
