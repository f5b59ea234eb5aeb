"""Shared fixtures: tiny offline Stable Diffusion models, built once per test session."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# fingerprints of weight files are remembered per test session, not in the user's cache
os.environ.setdefault("DIFFMEM_CACHE_DIR", tempfile.mkdtemp(prefix="diffmem-test-cache-"))
# One intra-op thread: several tests run subprocesses (accelerate, SIGKILL resume) beside this one, and
# oversubscribed OpenMP threads spin-wait, which made tiny-model calls up to 20x slower on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """An SD-1.x-like (epsilon) tiny model saved as a standard diffusers folder."""
    from diffmem.tiny import TinySDConfig, build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd1")
    build_tiny_pipeline(TinySDConfig(variant="sd1"), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """An SD-2.x-like (v-prediction) tiny model saved as a standard diffusers folder."""
    from diffmem.tiny import TinySDConfig, build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd2")
    build_tiny_pipeline(TinySDConfig(variant="sd2"), seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def tiny_sd_dir(request, tiny_sd1_dir, tiny_sd2_dir):
    """Both variants, for tests that must hold for epsilon and v-prediction alike."""
    return tiny_sd1_dir if request.param == "sd1" else tiny_sd2_dir


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny SDXL (two text encoders, text_time micro-conditioning) saved as a standard diffusers folder."""
    from diffmem.tiny import build_tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd1_pipes(tiny_sd1_dir):
    """(stock, guarded) tiny SD-1 pipelines sharing their modules (``from_pipe``), fresh for each test module."""
    from diffmem.pipelines import StableDiffusionMemGuardPipeline
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    stock.set_progress_bar_config(disable=True)
    guarded = StableDiffusionMemGuardPipeline.from_pipe(stock)
    guarded.set_progress_bar_config(disable=True)
    return stock, guarded
