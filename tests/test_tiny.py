"""The tiny-model builder: real CLIP tokenizer, both SD variants, save/load round trip."""

import torch


def test_clip_tokenizer_matches_openai_ids():
    from diffmem.tiny import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tiny_pipeline_round_trips(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    from diffmem.tiny import TinySDConfig, build_tiny_pipeline

    variant = "sd2" if "sd2" in str(tiny_sd_dir) else "sd1"
    built = build_tiny_pipeline(TinySDConfig(variant=variant), seed=0)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert loaded.scheduler.config.prediction_type == ("v_prediction" if variant == "sd2" else "epsilon")
    kwargs = dict(num_inference_steps=2, output_type="np")
    a = built("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 32, 32, 3)
    assert (a == b).all()


def test_cross_attention_in_down_mid_and_up_blocks(tiny_sd1_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_dir, subfolder="unet")
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2.to_v")]
    assert any(n.startswith("down_blocks") for n in names)
    assert any(n.startswith("mid_block") for n in names)
    assert any(n.startswith("up_blocks") for n in names)
