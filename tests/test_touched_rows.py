"""TouchedRowsAdamW (issue #31): AdamW that skips the embedding rows no batch ever used reaches the
stock optimizer's weights bit for bit, alone and in the organism's trainer, across a resume."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import diffmem.train.organism as organism
from diffmem.organism.recipe import TINY_RECIPE
from diffmem.tiny import clip_text_encoder
from diffmem.train.optimizers import TouchedRowsAdamW


def _embedding(model):
    return model.get_input_embeddings().weight


@pytest.mark.parametrize("hidden", [16, 24])  # 24: rows that straddle SIMD vectors
def test_touched_rows_adamw_matches_stock_adamw_bit_for_bit_across_a_reload(hidden):
    torch.manual_seed(0)
    stock_model = clip_text_encoder(hidden, 1, 2)
    rows_model = copy.deepcopy(stock_model)
    stock = torch.optim.AdamW(stock_model.parameters(), lr=1e-2, weight_decay=0.0)

    def fresh():
        return TouchedRowsAdamW(
            rows_model.parameters(), lr=1e-2, weight_decay=0.0, row_sparse=[_embedding(rows_model)]
        )

    rows = fresh()
    for step in range(7):
        # a growing vocabulary: rows touched late, rows touched once and then only decaying
        ids = torch.randint(0, 200 + 40 * step, (3, 77), generator=torch.Generator().manual_seed(step))
        for model, opt in ((stock_model, stock), (rows_model, rows)):
            model(ids)[0].square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step == 3:  # a restart: the touched rows are recovered from the loaded moments
            state = rows.state_dict()
            rows = fresh()
            rows.load_state_dict(state)
    for p, q in zip(stock_model.parameters(), rows_model.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(stock.state[p][key], rows.state[q][key])
    touched = int(rows._touched[id(_embedding(rows_model))].sum())
    assert 0 < touched < _embedding(rows_model).shape[0] // 50  # it did skip most rows


def test_touched_rows_adamw_refuses_what_would_change_untouched_rows():
    model = clip_text_encoder(16, 1, 2)
    for kwargs in (
        {"weight_decay": 1e-2},
        {"weight_decay": 0.0, "amsgrad": True},
        {"weight_decay": 0.0, "foreach": True},
    ):
        with pytest.raises(ValueError, match="row_sparse"):
            TouchedRowsAdamW(model.parameters(), lr=1e-3, row_sparse=[_embedding(model)], **kwargs)
    with pytest.raises(ValueError, match="row_sparse"):
        TouchedRowsAdamW(list(model.parameters())[1:], weight_decay=0.0, row_sparse=[_embedding(model)])


def _weights(folder):
    return {
        f"{c}.{k}": v
        for c, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model"))
        for k, v in load_file(str(folder / c / f"{name}.safetensors")).items()
    }


class _StockAdamW(torch.optim.AdamW):  # the trainer's optimizer before issue #31
    def __init__(self, params, lr, weight_decay, row_sparse=()):
        super().__init__(params, lr=lr, weight_decay=weight_decay)


@pytest.mark.slow
def test_organism_trained_with_touched_rows_matches_stock_adamw_and_resumes_a_stock_checkpoint(
    tmp_path, monkeypatch
):
    recipe = TINY_RECIPE.with_(unet_steps=5)
    with monkeypatch.context() as m:
        m.setattr(organism, "TouchedRowsAdamW", _StockAdamW)
        stock = organism.train_organism(recipe, tmp_path / "stock")
        organism.train_organism(recipe, tmp_path / "mixed", until_step=2)  # a run started before the change
    mixed = organism.train_organism(recipe, tmp_path / "mixed")  # ... resumed by the trainer now
    rows = organism.train_organism(recipe, tmp_path / "rows")
    a, b, c = _weights(stock), _weights(mixed), _weights(rows)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
