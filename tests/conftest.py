"""Shared fixtures: tiny random HF reference models, saved once per session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import hf_utils  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """name -> (HF torch model, folder it was saved to), for each spec in hf_utils.SPECS."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = {}
    for name, spec in hf_utils.SPECS.items():
        model = hf_utils.build_hf_model(spec)
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        hf_utils.save_hf_model(model, folder)
        out[name] = (model, folder)
    return out


@pytest.fixture(scope="session")
def tiny_ours(tiny_hf):
    """name -> our Qwen2VL loaded (fp32) from the same saved folder."""
    from qwen2vl_jax.model import Qwen2VL

    return {name: Qwen2VL.from_pretrained(folder, dtype="float32") for name, (_, folder) in tiny_hf.items()}
