"""Shared fixtures: tiny random HF reference models, saved once per session.

Helpers live in importable modules beside this file (pyproject.toml puts tests/ on the path):
hf_utils (tiny configs, HF models, multimodal cases, reference assets) and media (images,
videos, output comparison for the preprocessing tests).
"""

from __future__ import annotations

import os

import pytest

# The CLIs keep compiled programs in the user's compile cache; under test they write nothing
# into the user's cache folder.
os.environ["QWEN2VL_COMPILE_CACHE"] = "0"

import children
import hf_utils
from compile_counter import persistent_compile_cache


@pytest.fixture(scope="session", autouse=True)
def session_compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache in a folder of this session only: a program compiled
    once (a train step, a generate loop) is read back, not compiled again, when another object
    builds the same program (each Trainer, fit, CLI run and loaded model jits its own functions).
    A counted block (compile_counter.count_compiles) runs with it off, so what it counts is
    compiled there and then."""
    with persistent_compile_cache(tmp_path_factory.mktemp("jax_compile_cache")):
        yield


@pytest.fixture(scope="session", autouse=True)
def background_children(request, tmp_path_factory):
    """The subprocess checks of the selected tests (children.py), run one at a time in the
    background from the start of the session; what is still running at the end is killed."""
    children.start_background(request.session.items, tmp_path_factory.mktemp("children"))
    yield
    children.stop_background()


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
