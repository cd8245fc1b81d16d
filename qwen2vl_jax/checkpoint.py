"""The converted-folder layout and Orbax save/load of a parameter tree.

A converted folder (what `qwen2vl-convert` writes, what training saves) holds:

    config.json         the HF config, copied as is (either layout; `Qwen2VLConfig.from_hf` reads it)
    qwen2vl_jax.json    the marker: format name, version, dtype of the stored params
    params/             an Orbax PyTree checkpoint of {visual, model, lm_head}, paths as in the model
    tokenizer.json, preprocessor_config.json, chat_template.json ...   copied from the HF folder

Params go through Orbax's v1 API. `ParamWriter` streams a tree into `params/` one group of
leaves at a time (Orbax partial save, then finalize), so a conversion never holds more than one
layer; `save_params` writes a whole in-memory tree (training); `load_params` checks the stored
names and shapes against the config, then restores straight into the requested dtype and
shardings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.errors import CheckpointError
from qwen2vl_jax.hf_mapping import convert_tensors
from qwen2vl_jax.jsonio import read_json
from qwen2vl_jax.modules.qwen2vl import init_shapes
from qwen2vl_jax.params import flatten, unflatten
from qwen2vl_jax.safetensors_io import list_tensors

MARKER = "qwen2vl_jax.json"
PARAMS = "params"
FORMAT = "qwen2vl-jax"
VERSION = 1

# Non-weight files of an HF folder that a converted folder keeps (tokenizer, processor, chat
# template, generation defaults, license and card).
SIDE_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken", ".md")
SIDE_SKIP = ("model.safetensors.index.json", MARKER)


def _ocp():
    """Orbax's v1 API (partial save/load live there)."""
    try:
        from orbax.checkpoint import v1

        v1.partial.save_async, v1.partial.finalize  # noqa: B018
    except (ImportError, AttributeError):
        import importlib.metadata

        found = importlib.metadata.version("orbax-checkpoint")
        raise CheckpointError(f"orbax-checkpoint {found} lacks the v1 partial-save API; install >= 0.12.8") from None
    return v1


# ---------------------------------------------------------------- the folder
def is_converted(folder: str | Path) -> bool:
    """True for a folder written by `qwen2vl-convert` or `save_params`."""
    return (Path(folder) / MARKER).is_file()


def read_marker(folder: str | Path) -> dict:
    path = Path(folder) / MARKER
    marker = read_json(path, error=CheckpointError)
    if marker.get("format") != FORMAT or not isinstance(marker.get("version", 0), int) or marker.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path}: format {marker.get('format')!r} version {marker.get('version')!r} is not one this "
            f"qwen2vl-jax reads ({FORMAT!r} <= {VERSION})"
        )
    return marker


def read_config(folder: str | Path) -> Qwen2VLConfig:
    """The folder's config.json (`Qwen2VLConfig.from_hf`: any problem is one CheckpointError)."""
    return Qwen2VLConfig.from_hf(folder)


def write_marker(folder: str | Path, dtype, **extra) -> None:
    marker = {"format": FORMAT, "version": VERSION, "params": PARAMS, "dtype": jnp.dtype(dtype).name, **extra}
    (Path(folder) / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def side_files(folder: str | Path) -> list[Path]:
    """The tokenizer/processor/config files of an HF or converted folder (no weights)."""
    return sorted(
        p for p in Path(folder).iterdir()
        if p.is_file() and p.name not in SIDE_SKIP
        and (p.suffix in SIDE_SUFFIXES or p.name.upper().startswith("LICENSE"))
    )


def copy_side_files(src: str | Path, dst: str | Path, skip: Iterable[str] = ()) -> list[str]:
    """Copies `side_files(src)` into `dst`; returns the names copied."""
    skip = set(skip)
    names = []
    for p in side_files(src):
        if p.name not in skip:
            shutil.copyfile(p, Path(dst) / p.name)
            names.append(p.name)
    return names


# ---------------------------------------------------------------- saving
def save_params(params, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Writes a whole param tree (numpy or jax arrays, sharded or not) to `folder/params`
    and the marker. Orbax writes to a temporary name and renames, so a failure leaves no
    `params/`. The folder's config.json and tokenizer files are the caller's to write."""
    folder = Path(folder).resolve()  # Orbax takes absolute paths only
    folder.mkdir(parents=True, exist_ok=True)
    _ocp().save(folder / PARAMS, params, overwrite=overwrite)
    dtypes = {jnp.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(params)}
    write_marker(folder, dtypes.pop() if len(dtypes) == 1 else jnp.float32)
    return folder / PARAMS


class ParamWriter:
    """Streams a param tree into `folder/params`, one group of leaves per `write`.

    Each group is written and released before the next is built, so peak memory is one
    group, not the whole tree. Nothing is readable at `folder/params` until `finalize`."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder).resolve() / PARAMS
        self.written: set[str] = set()

    def write(self, flat: dict[str, np.ndarray]) -> None:
        """flat: {'model/layers_3/mlp/up_proj/kernel': array, ...}; paths not yet written."""
        again = self.written.intersection(flat)
        if again:
            raise ValueError(f"parameters written twice: {sorted(again)}")
        response = _ocp().partial.save_async(self.path, unflatten(flat))
        try:
            response.result()
        except BaseException:
            # Interrupted while Orbax writes in its background threads: let the write end
            # before the caller removes the folder, or the threads would recreate parts of it.
            try:
                response.result()
            except Exception:
                pass
            raise
        self.written.update(flat)

    def finalize(self) -> Path:
        _ocp().partial.finalize(self.path)
        return self.path


# ---------------------------------------------------------------- loading
def expected_shapes(config: Qwen2VLConfig) -> dict[str, tuple[int, ...]]:
    """JAX path -> shape of every parameter the config's model has."""
    return {k: tuple(v.shape) for k, v in flatten(init_shapes(config)).items()}


def stored_params(folder: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """JAX path -> (shape, dtype) of every array in `folder/params`, read from metadata only."""
    path = Path(folder).resolve() / PARAMS
    if not path.is_dir():
        raise CheckpointError(f"{folder}: no {PARAMS}/ checkpoint")
    state = path / "state"
    if state.is_dir() and not (state / "manifest.ocdbt").exists() and (
        (state / "d").exists() or any(state.glob("ocdbt.process_*"))
    ):  # Orbax would log a traceback per array before giving up
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint (state/manifest.ocdbt is missing)")
    try:
        tree = _ocp().metadata(path).metadata
    except Exception as e:  # Orbax raises several types for a damaged or foreign folder
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({_first_line(e)})") from None
    try:
        return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flatten(tree).items()}
    except (AttributeError, TypeError) as e:  # e.g. no tree at all when state/manifest.ocdbt is gone
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint (no parameter metadata: "
                              f"{_first_line(e)})") from None


def _restore(path: Path, abstract):
    """Orbax's load, with a damaged data file (truncated, missing) as one CheckpointError."""
    try:
        return _ocp().load(path, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # tensorstore reports damage as ValueError, OSError, ...
        raise CheckpointError(f"{path}: cannot read the stored params ({_first_line(e)})") from None


def check_params(folder: str | Path, config: Qwen2VLConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Stored names and shapes vs the config; every difference in one CheckpointError."""
    stored = stored_params(folder)
    expected = expected_shapes(config)
    extra = sorted(set(stored) - set(expected))
    missing = sorted(set(expected) - set(stored))
    wrong = [
        f"{k}: stored {stored[k][0]}, config expects {shape}"
        for k, shape in expected.items() if k in stored and stored[k][0] != shape
    ]
    problems = []
    if extra:
        problems.append(f"{len(extra)} parameter(s) the config does not have: " + ", ".join(extra[:20]))
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing: " + ", ".join(missing[:20]))
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): " + "; ".join(wrong[:20]))
    if problems:
        raise CheckpointError(f"{folder}: params do not match config.json: " + " | ".join(problems))
    return stored


def load_params(folder: str | Path, config: Qwen2VLConfig, dtype=None, shardings=None) -> dict:
    """Restores `folder/params` as a nested dict of jax arrays.

    dtype: the arrays' dtype (cast on restore); None keeps the stored dtype.
    shardings: None (default device), one `jax.sharding.Sharding` for every parameter, or a
      tree like the params (e.g. from `sharding.param_shardings`); each array is restored
      straight into its sharding, never gathered on one host first.
    """
    folder = Path(folder).resolve()
    stored = check_params(folder, config)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = dict.fromkeys(stored, shardings or default)
    else:
        flat_shardings = flatten(shardings)
        absent = sorted(set(stored) - set(flat_shardings))
        if absent:
            raise CheckpointError(f"shardings lack {len(absent)} parameter(s): " + ", ".join(absent[:20]))
    abstract = {
        k: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype) if dtype is not None else stored_dtype,
                                sharding=flat_shardings[k])
        for k, (shape, stored_dtype) in stored.items()
    }
    return _restore(folder / PARAMS, unflatten(abstract))


def load_numpy(folder: str | Path, paths: Iterable[str], dtype=None) -> dict[str, np.ndarray]:
    """Restores only `paths` of `folder/params` as host numpy arrays (stored dtype unless
    `dtype`): lets a caller walk a large checkpoint one group at a time."""
    stored = stored_params(folder)
    paths = list(paths)
    abstract = {p: np.empty((0,), dtype if dtype is not None else stored[p][1]) for p in paths}
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        tree = _restore(Path(folder).resolve() / PARAMS, unflatten(abstract))
    return {p: np.asarray(v) for p, v in flatten(tree).items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def load_hf_params(path: str | Path, config: Qwen2VLConfig, dtype, host: bool = False) -> dict:
    """HF safetensors in `path` -> nested param dict (names and shapes checked against
    `config`); host=True keeps numpy arrays (for placing on a mesh without a one-device copy)."""
    expected = {k: v.shape for k, v in flatten(init_shapes(config)).items()}
    flat = convert_tensors(
        list_tensors(Path(path)), expected, tie_word_embeddings=config.tie_word_embeddings,
        cast=(lambda a: np.asarray(a, dtype)) if host else (lambda a: jnp.asarray(a, dtype)),
    )
    return unflatten(flat)
