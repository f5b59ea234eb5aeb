"""NeMo on a model where the answer is known: one planted value neuron alone carries a trigger prompt.

The planted model (built from a tiny SD-1.x model, :func:`plant_trigger_neuron`):

* text encoder: a dedicated hidden coordinate ``D`` is structurally zero for every token (its token and
  position embeddings are 0 there, no attention/MLP output writes it) except the trigger word, whose
  token embedding is large in ``D``; after the final layer norm (bias shifted to centre ordinary
  prompts) only the trigger's position carries a large value in ``D``.
* one cross-attention head of one value layer: its queries are constant (a layer-norm coordinate fixed
  to 1) and its keys read ``D``, so it attends to the trigger token when there is one and spreads
  evenly otherwise; the planted channel of ``to_v`` reads ``D`` with a large gain, and its column of
  ``to_out`` writes a large random vector into the residual stream; ``conv_out`` is scaled up so the
  resulting seed-independent pattern dominates the first-step noise prediction.

So the trigger prompt's noise differences agree across seeds (memorized), ordinary prompts' do not,
switching the planted neuron off removes the agreement, and switching other neurons off changes
nothing: the search must find that neuron among all 160.
"""

from __future__ import annotations

import pytest
import torch

from diffmem.conditioning import encode_prompts
from diffmem.edits import NeuronSet
from diffmem.hooks.neurons import value_layers
from diffmem.localize.nemo import (
    NeMo,
    NemoConfig,
    NoiseSimilarity,
    candidate_lists,
    default_mask_batch,
    greedy_unblock,
    initial_schedule,
)
from diffmem.localize.stats import ValueStats, compute_value_stats
from diffmem.tiny import TinySDConfig, build_components

TRIGGER = "pikachu"
PLANT_LAYER, PLANT_CHANNEL = 2, 5  # the mid block's value layer, channel 5
REFERENCE = [
    "a photo of a dog",
    "a red car",
    "two cats on a sofa",
    "a house by the lake",
    "a bowl of fruit",
    "a man riding a bike",
    "an old tree in the snow",
    "a plate of pasta",
    "a sailing boat at sunset",
    "children playing football",
    "a city street at night",
    "a blue vase with flowers",
]


def plant_trigger_neuron(
    components: dict,
    word: str = TRIGGER,
    layer: int = PLANT_LAYER,
    channel: int = PLANT_CHANNEL,
    gain: float = 400.0,
    out_scale: float = 3.0,
    conv_scale: float = 10.0,
    focus: float = 3.0,
    coord: int = 0,
) -> str:
    """Make value neuron ``channel`` of value layer ``layer`` carry ``word`` (see the module docstring); returns its layer name."""
    tok, te, unet = components["tokenizer"], components["text_encoder"], components["unet"]
    ids = tok(word).input_ids[1:-1]
    assert len(ids) == 1, f"{word!r} must be a single token"
    with torch.no_grad():
        emb = te.get_input_embeddings().weight
        emb[:, coord] = 0
        emb[ids[0]] = 0
        emb[ids[0], coord] = 10.0
        for name, p in te.named_parameters():
            if name.endswith("position_embedding.weight"):
                p[:, coord] = 0
            if name.endswith(("out_proj.weight", "fc2.weight")):
                p[coord, :] = 0
            if name.endswith(("out_proj.bias", "fc2.bias", "final_layer_norm.bias")):
                p[coord] = 0
        h = encode_prompts(tok, te, REFERENCE[:4])
        for name, p in te.named_parameters():
            if name.endswith("final_layer_norm.bias"):
                p[coord] -= h[..., coord].mean()
        name = list(value_layers(unet))[layer]
        to_v = unet.get_submodule(name)
        attn = unet.get_submodule(name.rsplit(".", 1)[0])
        block = unet.get_submodule(name.rsplit(".", 2)[0])
        hd = to_v.out_features // attn.heads
        rows = slice((channel // hd) * hd, (channel // hd + 1) * hd)
        block.norm2.weight[0] = 0
        block.norm2.bias[0] = 1.0
        attn.to_q.weight[rows] = 0
        attn.to_q.weight[rows, 0] = 1.0
        attn.to_k.weight[rows] = 0
        attn.to_k.weight[rows, coord] = focus / hd**0.5
        to_v.weight[channel] = 0
        to_v.weight[channel, coord] = gain
        g = torch.Generator().manual_seed(0)
        attn.to_out[0].weight[:, channel] = (
            torch.randn(attn.to_out[0].weight.shape[0], generator=g) * out_scale
        )
        unet.conv_out.weight *= conv_scale
        unet.conv_out.bias *= conv_scale
    return name


@pytest.fixture(scope="module")
def planted():
    c = build_components(TinySDConfig(variant="sd1"), seed=0)
    name = plant_trigger_neuron(c)
    stats = compute_value_stats(
        c["unet"], c["text_encoder"], c["tokenizer"], REFERENCE, batch_size=5, progress=False
    )
    return c, name, stats


@pytest.fixture(scope="module")
def nemo(planted):
    c, _, stats = planted
    calib = NeMo(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], stats, NemoConfig())
    threshold = calib.calibrate_threshold(REFERENCE[:8])
    # batched search (the CUDA default) even on a CPU; test_batched_search_equals_one_at_a_time needs it
    config = NemoConfig(threshold=threshold, mask_batch=8)
    return NeMo(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], stats, config)


def test_planted_neuron_is_found(planted, nemo):
    _, name, _ = planted
    assert 0.2 < nemo.config.threshold < 0.6
    result = nemo.localize(f"a photo of {TRIGGER}")
    assert result.info["memorized"] and result.info["outcome"] == "localized" and result.info["criterion_met"]
    assert "all_off_score" not in result.info  # the early-exit heuristic is off by default
    assert result.score_before[0] > nemo.config.threshold
    found = result.items()
    assert (name, PLANT_CHANNEL) in found, found
    assert len(found) <= 3, found
    assert result.score_after[0] <= nemo.config.threshold
    assert result.info["detection_after"] <= nemo.config.threshold
    # the planted neuron is out of distribution for the trigger prompt
    assert (name, PLANT_CHANNEL) in [
        (result.layers[li], i) for li, idx in enumerate(result.info["initial_neurons"]) for i in idx
    ]


def test_only_the_planted_neuron_matters(planted, nemo):
    _, name, _ = planted
    probe = nemo.probe(f"a photo of {TRIGGER}")
    assert probe.memorized
    li = list(nemo.layers).index(name)
    planted_mask = probe.mask_from_lists(
        [[PLANT_CHANNEL] if i == li else [] for i in range(len(nemo.layers))]
    )
    # 20 random other neurons, none of them the planted one
    g = torch.Generator().manual_seed(3)
    others = torch.randperm(probe.n_neurons, generator=g)
    others = others[others != probe.offsets[li] + PLANT_CHANNEL][:20]
    other_mask = torch.zeros_like(planted_mask)
    other_mask[others] = True
    off, on = probe.scores(torch.stack([planted_mask, other_mask])).tolist()
    assert off <= nemo.config.threshold < on
    # an ordinary prompt is not memorized and gets no neurons
    ordinary = nemo.localize("a photo of a horse")
    assert not ordinary.info["memorized"] and len(ordinary) == 0
    assert ordinary.info["outcome"] == "not_memorized" and ordinary.info["unet_calls"] == 1


def _budgeted(planted, nemo, **kw) -> NeMo:
    c, _, stats = planted
    config = NemoConfig(**{"threshold": nemo.config.threshold, **kw})
    return NeMo(c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], stats, config)


@pytest.mark.parametrize("mask_batch, max_calls, early_exit", [(1, 3, False), (1, 4, False), (8, 3, True)])
def test_search_stops_at_max_unet_calls(tmp_path, planted, nemo, mask_batch, max_calls, early_exit):
    """A cut search made exactly ``max_unet_calls`` calls (the last one the final evaluation of the best
    mask so far), returns that mask (blocking the prompt) and says so; it round-trips through JSON."""
    _, name, _ = planted
    prompt = f"a photo of {TRIGGER}"
    full = _budgeted(planted, nemo, mask_batch=mask_batch, early_exit=early_exit).localize(prompt)
    assert full.info["outcome"] == "localized" and full.info["unet_calls"] > max_calls
    seen = []
    cut = _budgeted(
        planted, nemo, mask_batch=mask_batch, max_unet_calls=max_calls, early_exit=early_exit
    ).localize(prompt, progress=lambda state: seen.append((state.stage, state.unet_calls, state.outcome)))
    assert cut.info["outcome"] == "budget_exhausted" and cut.info["stopped_by"] == "max_unet_calls"
    assert cut.info["unet_calls"] == max_calls and max(calls for _, calls, _ in seen) == max_calls
    assert seen[-1] == ("done", max_calls, "budget_exhausted")
    assert cut.info["criterion_met"] and cut.score_after[0] <= nemo.config.threshold
    assert (name, PLANT_CHANNEL) in cut.items() and len(cut) >= len(full)
    if early_exit:  # probe + all-off check + final: the all-off mask is the best known
        assert len(cut) == sum(len(n) for n in cut.neurons) == 160
    loaded = NeuronSet.load(cut.save(tmp_path / "cut.json"))
    assert loaded.info == cut.info and loaded.items() == cut.items()


def test_other_budgets(planted, nemo):
    prompt = f"a photo of {TRIGGER}"
    timed = _budgeted(planted, nemo, max_seconds=1e-9).localize(prompt)  # no search call may start
    assert timed.info["outcome"] == "budget_exhausted" and timed.info["stopped_by"] == "max_seconds"
    assert timed.info["unet_calls"] == 1 and len(timed) == 0 and "criterion_met" not in timed.info
    few = _budgeted(planted, nemo, mask_batch=1, max_candidates=0).localize(prompt)
    assert few.info["outcome"] == "budget_exhausted" and few.info["stopped_by"] == "max_candidates"
    assert few.info["criterion_met"] and len(few) == 1  # the layer refinement left only the planted neuron
    assert few.info["unet_calls"] == 4  # probe, schedule, layers, final: no neuron-wise test
    for bad in ({"max_unet_calls": 0}, {"max_seconds": 0.0}, {"max_candidates": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NemoConfig(**bad)


def test_flagged_prompt_that_blocking_cannot_move_is_not_localizable(tmp_path, planted, nemo):
    """With the early-exit heuristic on, a prompt forced over the threshold whose score stays above it
    with every searched neuron off ends after two UNet calls (unblocked pass, all-off check), empty."""
    prompt = "a photo of a horse"
    threshold = nemo.probe(prompt).score - 0.05  # flags it: some seeds are above this
    found = _budgeted(planted, nemo, threshold=threshold, early_exit=True).localize(prompt)
    assert found.info["memorized"] and found.info["outcome"] == "not_localizable"
    assert found.info["unet_calls"] == 2 and len(found) == 0
    assert found.info["all_off_score"] > threshold
    loaded = NeuronSet.load(found.save(tmp_path / "horse.json"))
    assert loaded.info == found.info and loaded.info["outcome"] == "not_localizable"


def test_a_narrow_miss_is_reported_not_discarded(planted, nemo):
    """Threshold just under what switching the planted neuron off reaches: the complete search cannot
    meet it; missed by less than the threshold's spread, the set is kept and the outcome says so."""
    _, name, _ = planted
    prompt = f"a photo of {TRIGGER}"
    probe = nemo.probe(prompt)
    li = list(nemo.layers).index(name)
    alone = probe.mask_from_lists([[PLANT_CHANNEL] if i == li else [] for i in range(len(nemo.layers))])
    everything = torch.ones_like(alone)
    reachable = float(probe.scores(torch.stack([alone, everything])).min())
    threshold = reachable - 0.03
    assert nemo.probe(prompt).score > threshold
    found = _budgeted(planted, nemo, threshold=threshold, threshold_spread=0.1).localize(prompt)
    assert found.info["outcome"] == "near_miss" and not found.info["criterion_met"]
    assert 0 < found.info["margin"] <= 0.1 and found.score_after[0] == pytest.approx(
        threshold + found.info["margin"]
    )
    assert (name, PLANT_CHANNEL) in found.items()
    # the same miss against a threshold known to be sharp is not localizable; unknown spread: not assessed
    strict = _budgeted(planted, nemo, threshold=threshold, threshold_spread=found.info["margin"] / 2)
    assert strict.localize(prompt).info["outcome"] == "not_localizable"


def test_batched_search_equals_one_at_a_time(planted, nemo):
    c, _, stats = planted
    one = NeMo(
        c["unet"],
        c["scheduler"],
        c["text_encoder"],
        c["tokenizer"],
        stats,
        NemoConfig(threshold=nemo.config.threshold, mask_batch=1),
    )
    a = nemo.localize(f"{TRIGGER} on a bike")
    b = one.localize(f"{TRIGGER} on a bike")
    assert a.neurons == b.neurons and a.info["initial_neurons"] == b.info["initial_neurons"]
    assert a.info["unet_calls"] < b.info["unet_calls"]


# ------------------------------------------------------------------------------------- units
class _FakeProbe:
    """Scores masks by a rule: memorization is gone iff neuron 3 and (7 or 9) are off."""

    def __init__(self, mask_batch: int):
        self.mask_batch = mask_batch
        self.calls = 0

    def scores(self, masks: torch.Tensor) -> torch.Tensor:
        self.calls += -(-len(masks) // self.mask_batch)
        gone = masks[:, 3] & (masks[:, 7] | masks[:, 9])
        return torch.where(gone, 0.2, 0.8)


def test_default_mask_batch_batches_on_cuda_only():
    assert default_mask_batch(torch.device("cuda", 0)) == 8
    assert default_mask_batch(torch.device("cpu")) == 1
    assert default_mask_batch("cpu") == 1


@pytest.mark.parametrize("mask_batch", [2, 4, 16])
def test_speculative_greedy_is_exact(mask_batch):
    groups = [torch.tensor([i]) for i in range(16)]
    start = torch.ones(16, dtype=torch.bool)
    ref_probe, fast_probe = _FakeProbe(1), _FakeProbe(mask_batch)
    ref, _ = greedy_unblock(ref_probe, start.clone(), groups, 0.5)
    accepted = []
    fast, last = greedy_unblock(
        fast_probe, start.clone(), groups, 0.5, on_accept=lambda mask, score: accepted.append(mask)
    )
    assert ref.nonzero().flatten().tolist() == [3, 9]  # 7 went first, so 9 must stay
    assert torch.equal(ref, fast) and last == pytest.approx(0.2)
    assert len(accepted) == 14 and torch.equal(accepted[-1], fast)
    assert fast_probe.calls < ref_probe.calls == 16


def test_schedule_and_candidates():
    sched = initial_schedule(NemoConfig(), 1280)
    assert sched[0] == (5.0, 0) and sched[-1] == (1.25, 15) and len(sched) == 16
    a = [torch.tensor([5.0, 1.0, 9.0, 0.5])]
    z = [torch.tensor([0.0, -6.0, 2.0, 0.0])]
    assert candidate_lists(a, z, 5.0, 0) == [[1]]
    assert candidate_lists(a, z, 5.0, 2) == [[1, 2, 0]]
    assert candidate_lists(a, z, 5.0, 0, two_sided=False) == [[]]


def test_similarity_fits_the_latent_size():
    assert NoiseSimilarity(64).describe()["kind"] == "ms_ssim" and NoiseSimilarity(64).kernel_size == 11
    small = NoiseSimilarity(16)
    assert small.kind == "ms_ssim" and small.kernel_size == 3
    assert NoiseSimilarity(4).kind == "ssim"
    x = torch.rand(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(small(x, x), torch.ones(3))
    assert (small(x, x.roll(1, 0)) < 0.5).all()


def test_statistics_stream_and_roundtrip(tmp_path, planted):
    c, _, stats = planted
    one_batch = compute_value_stats(
        c["unet"], c["text_encoder"], c["tokenizer"], REFERENCE, batch_size=64, progress=False
    )
    from diffmem.hooks.neurons import value_activations

    acts = value_activations(
        value_layers(c["unet"]), encode_prompts(c["tokenizer"], c["text_encoder"], REFERENCE)
    )
    for a, mu, sd, mu1 in zip(acts, stats.mean, stats.std, one_batch.mean):
        torch.testing.assert_close(mu, a.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sd, a.std(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(mu, mu1, rtol=1e-5, atol=1e-6)
    path = stats.save(tmp_path / "stats.safetensors")
    loaded = ValueStats.load(path)
    assert loaded.layers == stats.layers and loaded.count == len(REFERENCE)
    loaded.check(c["unet"], stats.layers)
    other = build_components(TinySDConfig(variant="sd1"), seed=1)["unet"]
    with pytest.raises(ValueError, match="fingerprint"):
        loaded.check(other, stats.layers, source=str(path))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        ValueStats.load(tmp_path / "bad.safetensors")


def test_cli_localize_is_resumable(tmp_path, planted, nemo, capsys):
    from diffusers import StableDiffusionPipeline

    from diffmem.cli import main

    c, name, stats = planted
    model = tmp_path / "planted"
    StableDiffusionPipeline(
        **c, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    ).save_pretrained(model)
    stats.save(tmp_path / "stats.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of {TRIGGER}\na photo of a horse\n")
    out = tmp_path / "out"
    argv = ["localize", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--no-progress"]
    argv += ["--stats", str(tmp_path / "stats.safetensors"), "--threshold", str(nemo.config.threshold)]
    assert main(argv) == 0
    union = NeuronSet.load(out / "union.json")
    assert (name, PLANT_CHANNEL) in union.items() and len(union.prompts) == 2
    assert "(2 new)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "(0 new)" in capsys.readouterr().out
    assert (
        main(["localize", "--model", str(model), "--prompts", str(tmp_path / "none.txt"), "--out", str(out)])
        == 2
    )
    assert "none.txt" in capsys.readouterr().err
    # a budget and another resolution (latents 12x20 instead of the UNet's 16x16): recorded, obeyed
    argv[argv.index(str(out))] = str(tmp_path / "cut")
    assert (
        main(argv + ["--max-unet-calls", "3", "--height", "24", "--width", "40", "--dtype", "bfloat16"]) == 0
    )
    printed = capsys.readouterr().out
    assert "at threshold" in printed and "24x40 px" in printed and "budget_exhausted 1" in printed
    cut = NeuronSet.load(tmp_path / "cut" / "neurons" / "0.json")
    assert cut.info["outcome"] == "budget_exhausted" and cut.info["unet_calls"] <= 3
    assert cut.info["config"]["latent_size"] == [12, 20] and cut.info["config"]["max_unet_calls"] == 3
    union = NeuronSet.load(tmp_path / "cut" / "union.json")
    assert union.info["left_out"] == ([] if cut.info.get("criterion_met") else ["0"])


def test_localize_prompts_flow_is_cached_per_stage(tmp_path, planted, capsys):
    """Statistics -> calibrated threshold -> per-prompt sets -> union, every stage reused on a rerun."""
    from diffusers import StableDiffusionPipeline

    from diffmem.evaluate.localization import localize_prompts, neuron_file_name, random_control
    from diffmem.fingerprint import model_fingerprint

    c, name, _ = planted
    pipe = StableDiffusionPipeline(
        **c, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    prompts = [("trigger/1", f"a photo of {TRIGGER}"), ("horse", "a photo of a horse")]
    kw = dict(calibration_prompts=8, cache_dir=tmp_path, config=NemoConfig(mask_batch=8))
    run = localize_prompts(pipe, prompts, REFERENCE, **kw, progress=True)
    assert run.memorized == ["trigger/1"] and run.new == 2
    assert "trigger/1: localized (5 calls)" in capsys.readouterr().err  # the per-prompt outcome is shown
    assert run.outcomes == {"localized": 1, "not_memorized": 1} == run.union.info["outcomes"]
    assert (name, PLANT_CHANNEL) in run.union.items() and len(run.union.prompts) == 2
    assert 0.2 < run.threshold < 0.6 and run.union.info["threshold"] == run.threshold
    for stage in ("stats.safetensors", "threshold.json", "union.json", "neurons/horse.json"):
        assert (tmp_path / stage).is_file(), stage
    assert neuron_file_name("trigger/1") != neuron_file_name("trigger_1")
    again = localize_prompts(pipe, prompts, REFERENCE, **kw)
    assert again.new == 0 and again.threshold == run.threshold
    assert again.union.items() == run.union.items()
    assert capsys.readouterr().err == ""  # progress off: nothing printed
    # another budget is another search for every prompt, but the same calibrated threshold
    calibrated = (tmp_path / "threshold.json").stat().st_mtime_ns
    cut = {**kw, "config": NemoConfig(mask_batch=8, max_unet_calls=3)}
    budgeted = localize_prompts(pipe, prompts, REFERENCE, **cut)
    assert budgeted.new == 2 and budgeted.threshold == run.threshold
    assert (tmp_path / "threshold.json").stat().st_mtime_ns == calibrated
    assert budgeted.outcomes == {"budget_exhausted": 1, "not_memorized": 1}
    assert localize_prompts(pipe, prompts, REFERENCE, **cut).new == 0
    # another threshold is another search: nothing is reused
    assert localize_prompts(pipe, prompts, REFERENCE, **{**kw, "cache_dir": tmp_path}, threshold=0.9).new == 2
    with pytest.raises(ValueError, match="unique"):
        localize_prompts(pipe, [("a", "x"), ("a", "y")], REFERENCE, **kw)
    # a cached stage of another model is recomputed, not an error (given statistics of one still are)
    stale = run.stats
    stale.fingerprint = "0123456789abcdef"
    stale.save(tmp_path / "stale" / "stats.safetensors")
    fresh = localize_prompts(pipe, prompts[1:], REFERENCE, **{**kw, "cache_dir": tmp_path / "stale"})
    assert fresh.stats.fingerprint == model_fingerprint(pipe.unet)
    with pytest.raises(ValueError, match="old fingerprint"):
        localize_prompts(pipe, prompts[1:], REFERENCE, **kw, stats=stale)
    control = random_control(run.union, pipe.unet, seed=3)
    assert [len(n) for n in control.neurons] == [len(n) for n in run.union.neurons]
    assert control.items() == random_control(run.union, pipe.unet, seed=3).items() != run.union.items()
    control.validate(pipe.unet)
