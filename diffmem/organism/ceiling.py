"""How far can zeroing weights go? Whole layer groups of a UNet zeroed, each measured by one callable.

The bound behind the pruning row of ``benchmarks/dori_eval.py``: any subspace pruning of the FFN second
linear layers (Chavhan et al. 2024) removes a subset of what zeroing *all* of them removes, so a
measurement with every FFN weight zeroed is the most FFN pruning can be expected to reach. Other groups
(each FFN layer alone, the cross-attention values, keys and outputs, the self-attention outputs) show
where a model's memorization lives. On the organism the measurement is :func:`replication_and_fidelity`:
the memorization rate of the verbatim captions and caption fidelity on the held-out ones
(``benchmarks/prune_ceiling.py``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from diffmem.attack.dori import ssim_similarity
from diffmem.edits import WeightMask, applied
from diffmem.fingerprint import model_fingerprint
from diffmem.organism.fidelity import caption_fidelity
from diffmem.scores.replication import criterion
from diffmem.seeding import item_generator

__all__ = ["replication_and_fidelity", "zeroed_group_rows", "zeroing_groups"]

#: the other groups: every linear layer whose name ends so, zeroed together
_SUFFIX_GROUPS = (
    ("attn2.to_v", "every cross-attention value projection"),
    ("attn2.to_k", "every cross-attention key projection"),
    ("attn2.to_out.0", "every cross-attention output projection"),
    ("attn1.to_out.0", "every self-attention output projection"),
)


def zeroing_groups(unet: nn.Module) -> dict[str, list[str]]:
    """``{label: linear layer names}``: nothing (the unedited model), every FFN second linear layer, each
    of them alone, and the attention projections of :data:`_SUFFIX_GROUPS`."""
    linear = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    ffn = [n for n in linear if n.endswith(".ff.net.2")]
    groups = {"nothing (unedited)": [], "every FFN second linear layer": ffn}
    groups.update({f"FFN {n.split('.transformer_blocks')[0]} alone": [n] for n in ffn})
    for suffix, label in _SUFFIX_GROUPS:
        groups[label] = [n for n in linear if n.endswith(suffix)]
    return groups


def zeroed_group_rows(
    unet: nn.Module, groups: dict[str, list[str]], measure: Callable[[], dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """For each group, ``measure()`` with every weight of its layers zeroed (a :class:`WeightMask`,
    restored after): ``{"group", "layers", "weights", **measure()}``, one row at a time."""
    modules = dict(unet.named_modules())
    fingerprint = model_fingerprint(unet)
    for label, names in groups.items():
        mask = WeightMask(
            {n: torch.ones_like(modules[n].weight, dtype=torch.bool) for n in names}, fingerprint
        )
        with applied(unet, mask):
            yield {"group": label, "layers": len(names), "weights": mask.num_pruned(), **measure()}


@torch.no_grad()
def replication_and_fidelity(
    pipe,
    targets: Sequence[tuple[str, str, torch.Tensor]],
    heldout: Sequence[str],
    classifier,
    seeds: int,
    fidelity_seeds: int,
    **gen_kw,
) -> dict[str, Any]:
    """The organism's memorization rate of ``targets`` (``(id, caption, image in [0, 1])``: mean SSIM over
    ``seeds`` generations to the image at or above the ``organism-mean`` threshold, the generators of
    ``dori_eval.py``), its mean SSIM, and caption fidelity of ``fidelity_seeds`` generations of each
    ``heldout`` caption. ``gen_kw`` goes to every pipeline call (``output_type="pt"``)."""
    sims = []
    for rid, cap, img in targets:
        gens = torch.cat(
            [pipe(cap, generator=item_generator(s, "dori-gen", rid), **gen_kw).images for s in range(seeds)]
        )
        sims.append(statistics.fmean(float(x) for x in ssim_similarity(gens.float(), img)))
    images = torch.cat(
        [
            pipe(cap, generator=item_generator(s, "heldout", i), **gen_kw).images
            for i, cap in enumerate(heldout)
            for s in range(fidelity_seeds)
        ]
    )
    labels = [cap for cap in heldout for _ in range(fidelity_seeds)]
    return {
        "rate": float(criterion("organism-mean").memorized(torch.tensor(sims)[:, None]).float().mean()),
        "ssim_mean": statistics.fmean(sims),
        "fidelity": caption_fidelity(classifier, images.float(), labels).as_dict(),
    }
