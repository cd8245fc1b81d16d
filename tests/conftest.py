"""Shared fixtures: tiny random HF reference models, saved once per session.

Helpers live in importable modules beside this file (pyproject.toml puts tests/ on the path):
hf_utils (tiny configs, HF models, multimodal cases, reference assets) and media (images,
videos, output comparison for the preprocessing tests).
"""

from __future__ import annotations

import os

import pytest

# The CLIs keep compiled programs in the user's compile cache; under test they compile afresh
# (counted compilations stay exact) and write nothing into the user's cache folder.
os.environ["QWEN2VL_COMPILE_CACHE"] = "0"

import hf_utils


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
    from qwen2vl_jax import Qwen2VL  # the public name: stays valid while modules move

    return {name: Qwen2VL.from_pretrained(folder, dtype="float32") for name, (_, folder) in tiny_hf.items()}


@pytest.fixture(scope="session")
def reference_tokenizer():
    """A Qwen2-VL-Instruct folder with the real tokenizer, chat template and preprocessor
    config ($QWEN2VL_REFERENCE_ASSETS or ../shared/assets; skips when there is none)."""
    return hf_utils.reference_folder("tokenizer")
