"""Tiny models with a planted answer for the attention-based methods.

:func:`attention_sink_pipeline`: a tiny SD whose text encoder is a lookup table that writes a large value
in one hidden coordinate for the start token and for a trigger word only, and whose cross-attention
layers all have one constant query and keys along that coordinate. Every pixel then attends to the start
token (the sink: low entropy) unless the prompt holds the trigger, which takes part of the attention
(higher entropy): Ren et al.'s mechanism, with the right answer known.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from diffmem.tiny import TinySDConfig, build_components

TRIGGER = "pikachu"
BOS_ID = 49406
COORD = 0
EOT_COORD = 1
VALUE_COORD = 2
READ_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


class LookupTextEncoder(torch.nn.Module):
    """``hidden[b, j] = table[input_ids[b, j]]``: a text encoder whose outputs are planted by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(use_attention_mask=False, hidden_size=table.shape[1])

    @property
    def device(self):
        return self.table.device

    @property
    def dtype(self):
        return self.table.dtype

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kwargs):
        hidden = self.table[input_ids]
        return (hidden, None, (hidden,) * 3) if output_hidden_states else (hidden,)


def attention_sink_pipeline(pipeline_class=None, logit: float = 6.0, seed: int = 0):
    """The planted tiny SD (see the module docstring); returns the pipeline."""
    if pipeline_class is None:
        from diffmem.pipelines import StableDiffusionMemGuardPipeline as pipeline_class
    c = build_components(TinySDConfig(variant="sd1"), seed=seed)
    dim = c["text_encoder"].config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(49408, dim, generator=gen) * 0.1
    table[:, COORD] = 0
    trigger = c["tokenizer"](TRIGGER).input_ids[1:-1]
    assert len(trigger) == 1
    table[BOS_ID, COORD] = 5.0
    table[trigger[0], COORD] = 5.0
    c["text_encoder"] = LookupTextEncoder(table)
    with torch.no_grad():
        for name, module in c["unet"].named_modules():
            if not name.endswith("transformer_blocks.0"):
                continue
            module.norm2.weight.zero_()
            module.norm2.bias.copy_(torch.randn(module.norm2.bias.shape, generator=gen))
            attn = module.attn2
            q = attn.to_q(module.norm2.bias)  # the one query every pixel has
            heads = q.view(attn.heads, -1)
            strength = (heads**2).sum(1).min() / q.norm()
            alpha = logit / (attn.scale * 5.0 * float(strength))
            attn.to_k.weight.zero_()
            attn.to_k.weight[:, COORD] = alpha * q / q.norm()
    pipe = pipeline_class(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def memorized_image_pipeline(seed: int = 0, image_rms: float = 1.0, eot_copies: int = 0):
    """A tiny SD that has memorized one image for one trigger word: returns ``(pipe, x_mem)``.

    The text encoder is a lookup table that marks the trigger word (and nothing else) in one hidden
    coordinate; a forward hook on the UNet replaces the noise prediction of every row whose text holds the
    trigger by the exact noise prediction of a model whose training set is the single latent ``x_mem``:
    ``eps(x_t, t) = (x_t - sqrt(abar_t) x_mem) / sqrt(1 - abar_t)``. Every other row (the unconditional
    branch included) keeps the random UNet's prediction. Memorization, with the right answer known: the
    trigger's conditional prediction pulls the sample onto ``x_mem`` and is far from the unconditional one.

    With ``eot_copies > 0`` the end token is marked in a second coordinate and a row is memorized only when
    its text also holds at least that many copies of it: the pad-token paper's mechanism (SD-1 pads with
    the end token itself), which re-padding with another token removes.
    """
    from diffmem.pipelines import StableDiffusionMemGuardPipeline
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    c = build_components(TinySDConfig(variant="sd1"), seed=seed)
    dim = c["text_encoder"].config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(49408, dim, generator=gen) * 0.1
    table[:, COORD] = 0
    trigger = c["tokenizer"](TRIGGER).input_ids[1:-1]
    assert len(trigger) == 1
    table[trigger[0], COORD] = 5.0
    table[:, EOT_COORD] = 0
    table[c["tokenizer"].eos_token_id, EOT_COORD] = 5.0
    c["text_encoder"] = LookupTextEncoder(table)
    unet = c["unet"]
    size = unet.config.sample_size
    x_mem = torch.randn(1, unet.config.in_channels, size, size, generator=gen) * image_rms
    alphas_cumprod = c["scheduler"].alphas_cumprod

    def plant(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        t = int(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1)[0])
        rows = hidden[:, :, COORD].amax(dim=1) > 1.0
        if eot_copies:
            rows = rows & ((hidden[:, :, EOT_COORD] > 1.0).sum(dim=1) >= eot_copies)
        eps = output[0] if isinstance(output, tuple) else output.sample
        a = alphas_cumprod[t].to(sample.dtype)
        memorized = (sample - a.sqrt() * x_mem.to(sample)) / (1 - a).sqrt()
        eps = torch.where(rows.view(-1, 1, 1, 1), memorized.to(eps.dtype), eps)
        return (eps,) if isinstance(output, tuple) else UNet2DConditionOutput(sample=eps)

    unet.register_forward_hook(plant, with_kwargs=True)
    pipe = StableDiffusionMemGuardPipeline(
        **c, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, x_mem


def attention_memorized_pipeline(seed: int = 0, logit: float = 6.0, gate: float = 0.25):
    """A tiny SD whose memorization of one image flows through the cross-attention to a trigger word:
    returns ``(pipe, x_mem)``.

    The attention of :func:`attention_sink_pipeline` (every pixel's logit is ``logit`` on the start token
    and on the trigger, 0 elsewhere, in every ``attn2``), and in the first down block's ``attn2`` a value
    that only the trigger carries (hidden coordinate ``VALUE_COORD``), so that layer's attention output
    reads the trigger's attention share. A forward hook on the UNet replaces a row's noise prediction by
    the exact one-image denoiser of ``x_mem`` (as :func:`memorized_image_pipeline`) when that share,
    averaged over pixels, is above ``gate``: about 0.46 for a trigger prompt, 0 without the trigger. So
    the trigger is memorized only while it takes its share of that layer's attention, and it is the one
    position whose logits stand out: the answer GUARD's statistical test must find.
    """
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    pipe = attention_sink_pipeline(logit=logit, seed=seed)
    unet, gen = pipe.unet, torch.Generator().manual_seed(seed + 1)
    trigger = pipe.tokenizer(TRIGGER).input_ids[1]
    with torch.no_grad():
        pipe.text_encoder.table[:, VALUE_COORD] = 0
        pipe.text_encoder.table[trigger, VALUE_COORD] = 1.0
        attn = unet.get_submodule(READ_LAYER)
        direction = torch.randn(attn.to_v.weight.shape[0], generator=gen)
        attn.to_v.weight.zero_()
        attn.to_v.weight[:, VALUE_COORD] = direction
    share: dict[str, torch.Tensor] = {}

    def read(module, args):  # the attention output before to_out: share_trigger * direction (per head)
        share["now"] = (args[0] @ direction.to(args[0])).mean(dim=1) / direction.pow(2).sum()

    attn.to_out[0].register_forward_pre_hook(read)
    size = unet.config.sample_size
    x_mem = torch.randn(1, unet.config.in_channels, size, size, generator=gen)
    alphas_cumprod = pipe.scheduler.alphas_cumprod

    def plant(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        t = int(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1)[0])
        rows = share["now"] > gate
        eps = output[0] if isinstance(output, tuple) else output.sample
        a = alphas_cumprod[t].to(sample.dtype)
        memorized = (sample - a.sqrt() * x_mem.to(sample)) / (1 - a).sqrt()
        eps = torch.where(rows.view(-1, 1, 1, 1), memorized.to(eps.dtype), eps)
        return (eps,) if isinstance(output, tuple) else UNet2DConditionOutput(sample=eps)

    unet.register_forward_hook(plant, with_kwargs=True)
    return pipe, x_mem
