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

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.errors import CheckpointError, InputError, first_line, listing
from qwen2vl_jax.hf_mapping import convert_tensors
from qwen2vl_jax.jsonio import read_json
from qwen2vl_jax.modules.qwen2vl import init_shapes
from qwen2vl_jax.params import flatten, unflatten
from qwen2vl_jax.quant.format import PARTS as PACKED_PARTS, Scheme, float_view
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


def read_scheme(folder: str | Path) -> Scheme | None:
    """The quantization a converted folder's params hold (qwen2vl_jax.json), None for float."""
    raw = read_marker(folder).get("quantization")
    try:
        return None if raw is None else Scheme.from_json(raw, str(Path(folder) / MARKER))
    except InputError as e:
        raise CheckpointError(str(e)) from None


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
            raise ValueError(f"{len(again)} parameter(s) written twice: {listing(sorted(again))}")
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
def expected_shapes(config: Qwen2VLConfig, shapes: dict | None = None) -> dict[str, tuple[int, ...]]:
    """JAX path -> shape of every parameter the config's model has (`shapes`: its
    `init_shapes` tree, when the caller has built it already)."""
    return {k: tuple(v.shape) for k, v in flatten(init_shapes(config) if shapes is None else shapes).items()}


def stored_params(folder: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """JAX path -> (shape, dtype) of every array in `folder/params`, read from metadata only.

    A damaged folder (a file cut short, deleted or not valid) is one CheckpointError that names
    `folder/params` and what is wrong, never TensorStore's own report."""
    path = Path(folder).resolve() / PARAMS
    if not path.is_dir():
        raise CheckpointError(f"{folder}: no {PARAMS}/ checkpoint")
    problem = _missing_files(path)  # before Orbax: it logs a traceback per array on such damage
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint: {problem}")
    with _orbax_warnings() as warnings:
        try:
            tree = _ocp().metadata(path).metadata
            error = None
        except Exception as e:  # Orbax raises several types for a damaged or foreign folder
            tree, error = None, e
    if tree is not None:
        try:
            return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flatten(tree).items()}
        except (AttributeError, TypeError):
            pass
    problem = _diagnose(path)
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint: {problem}")
    # Orbax raised, or logged why it has no tree for the folder and returned None
    why = error if error is not None else (warnings[-1] if warnings else "it holds no parameter metadata")
    raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({_reason(why, path)})")


def _restore(path: Path, abstract):
    """Orbax's load, with a damaged data file (truncated, missing, corrupt) as one CheckpointError."""
    try:
        with _orbax_warnings():
            return _ocp().load(path, abstract)
    except CheckpointError:
        raise
    except Exception as e:  # tensorstore reports damage as ValueError, OSError, ...
        problem = _missing_files(path)
        raise CheckpointError(f"{path}: damaged checkpoint: {problem}" if problem else
                              f"{path}: cannot read the stored params ({_reason(e, path)})") from None


# ---------------------------------------------------------------- damage, in plain words
# A reference to a stretch of a file in an OCDBT tree dump: kind:base_path:file:offset:length.
_OCDBT_REF = re.compile(r"^(value|btreenode):([^:]*):([^:]+):(\d+):(\d+)$")
_MAX_NODES = 100_000


def _missing_files(path: Path) -> str | None:
    """What is missing or cut short among the files the checkpoint at `path` refers to, in
    words; None when nothing is (or the layout is not one this walks: Orbax then reports).

    Walks the OCDBT tree of `path/state` (the manifest and the B-tree nodes of the latest
    version, not the arrays) and compares every data file it refers to with what is on disk,
    so a truncated or deleted file is named before Orbax tries to read it."""
    state = path / "state"
    if not state.is_dir():
        return None
    if not (state / "manifest.ocdbt").exists():
        if (state / "d").exists() or any(state.glob("ocdbt.process_*")):
            return "state/manifest.ocdbt is missing"
        return None
    try:
        import tensorstore as ts  # noqa: PLC0415 - Orbax's own dependency

        store = ts.KvStore.open({"driver": "file", "path": f"{state}/"}).result()
        manifest = ts.ocdbt.dump(store).result()
        todo = [manifest["versions"][-1]["root"]["location"]]
        if not _OCDBT_REF.match(todo[0]):
            return None
    except ValueError as e:  # TensorStore's report: only its DATA_LOSS is damage for sure
        return _reason(e, path) if str(e).startswith("DATA_LOSS") else None
    except Exception:  # an empty tree, another tensorstore's API: Orbax reads it, or says
        return None
    need: dict[Path, int] = {}  # file -> bytes the tree needs in it
    kinds: dict[Path, str] = {}
    sizes: dict[Path, int | None] = {}  # None: no such file

    def size(file: Path) -> int | None:
        if file not in sizes:
            sizes[file] = file.stat().st_size if file.is_file() else None
        return sizes[file]

    dumped = set()
    while todo and len(dumped) < _MAX_NODES:
        for ref in todo:
            m = _OCDBT_REF.match(ref)
            file = state / m[2] / m[3]
            need[file] = max(need.get(file, 0), int(m[4]) + int(m[5]))
            kinds.setdefault(file, "data file" if m[1] == "value" else "index file")
        nodes = [r for r in todo if r.startswith("btreenode:") and r not in dumped]
        todo = []
        for ref in nodes:  # the nodes whose file holds them: their entries refer on
            m = _OCDBT_REF.match(ref)
            file = state / m[2] / m[3]
            dumped.add(ref)
            if (size(file) or 0) < int(m[4]) + int(m[5]):
                continue
            try:
                node = ts.ocdbt.dump(store, ref).result()
            except Exception:
                continue  # Orbax will say
            todo.extend(r for r in _strings(node) if _OCDBT_REF.match(r))
    bad = []
    for file, needed in need.items():
        rel = file.relative_to(path).as_posix()
        if size(file) is None:
            bad.append(f"{kinds[file]} {rel} is missing")
        elif size(file) < needed:
            bad.append(f"{kinds[file]} {rel} is cut short ({size(file):,} bytes, the checkpoint needs "
                       f"{needed:,}: an interrupted copy?)")
    return listing(bad, 2, sep="; ") if bad else None


def _strings(tree):
    if isinstance(tree, str):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _strings(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _strings(v)


def _diagnose(path: Path) -> str | None:
    """After Orbax failed: a file every checkpoint has that is missing or not valid JSON."""
    for name in ("_CHECKPOINT_METADATA", "state/_METADATA"):
        file = path / name
        if not file.parent.is_dir():
            return f"{file.parent.relative_to(path).as_posix()}/ is missing"
        if not file.is_file():
            return f"{name} is missing"
        try:
            read_json(file, error=CheckpointError, expect=None)
        except CheckpointError:
            return f"{name} is not valid JSON (cut short?)"
    return None


# TensorStore's words for damage, and what they mean.
_TS_STATUS = re.compile(r"\b(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                        r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
                        r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")
_TS_ARRAY = re.compile(r'in "([^"/]+)/(?:c/[^"]*|zarr\.json)"')
_TS_FILE = re.compile(r'local file "([^"]+)"')
_TS_MEANING = [
    (re.compile(r"Requested byte range \[\d+, (\d+)\) is not valid for value of size (\d+)"),
     lambda m, path: f"its data file is cut short ({int(m[2]):,} bytes, it needs {int(m[1]):,})"),
    (re.compile(r"Existing shard has size of 0 bytes"), lambda m, path: "its data file is missing or empty"),
    (re.compile(r'Error decoding local file "([^"]+)"'),
     lambda m, path: f"{_relative(m[1], path)} cannot be decoded (cut short or damaged)"),
    (re.compile(r"corrupt|decompress|checksum|crc32c", re.I), lambda m, path: "its data is corrupt"),
]


def _reason(error: BaseException | str, path: Path) -> str:
    """One short clause for an Orbax/TensorStore failure reading the checkpoint at `path`: the
    parameter and what is wrong with its data when TensorStore says, else the first line of
    the innermost message, without TensorStore's spec dumps and with paths relative to `path`."""
    texts = []
    seen = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    if isinstance(error, str):
        texts.append(error)
    detailed = [t for t in texts if _TS_STATUS.search(t)]
    text = (detailed or texts or [""])[-1]
    status = _TS_STATUS.search(text)
    text = text[status.start():] if status else text
    array = _TS_ARRAY.search(text)
    what = f"parameter {array[1].replace('.', '/')}" if array else None
    for pattern, meaning in _TS_MEANING:
        m = pattern.search(text)
        if m:
            return f"{what}: {meaning(m, path)}" if what else meaning(m, path).replace("its ", "a ", 1)
    files = _TS_FILE.findall(text)  # the database's folder, then the file it could not read
    if status and status[1] == "NOT_FOUND" and files:
        return f"{_relative(files[-1], path)} is missing"
    text = text.split("[tensorstore_spec=")[0].replace(f"{path}/", "").replace(str(path), PARAMS)
    return first_line(text.strip().rstrip("."), 200)


def _relative(name: str, path: Path) -> str:
    try:
        return Path(name).relative_to(path).as_posix()
    except ValueError:
        return name


@contextlib.contextmanager
def _orbax_warnings():
    """Orbax's warnings (absl's logger) while reading: kept out of the user's terminal, and
    handed to the caller, which reports the failure they explain as one line."""
    notes: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            notes.append(record.getMessage())
            return False
        return True

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield notes
    finally:
        logger.removeFilter(keep)


def check_params(folder: str | Path, config: Qwen2VLConfig,
                 shapes: dict | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Stored names and shapes vs the config; every difference in one CheckpointError. Returns
    `stored_params(folder)`. shapes: the config's `init_shapes` tree, when the caller has it."""
    stored = stored_params(folder)
    expected = expected_shapes(config, shapes)
    # packed quantized layers (quant/format.py) count as the float parameter they stand for
    view, wrong = float_view({k: shape for k, (shape, _) in stored.items()}, expected)
    extra = sorted(set(view) - set(expected))
    missing = sorted(set(expected) - set(view))
    wrong += [
        f"{k}: stored {view[k]}, config expects {shape}"
        for k, shape in expected.items() if k in view and view[k] != shape
    ]
    kinds = [(f"{len(extra)} parameter(s) the config does not have", extra, ", "),
             (f"{len(missing)} parameter(s) missing", missing, ", "),
             (f"{len(wrong)} shape mismatch(es)", wrong, "; ")]
    kinds = [k for k in kinds if k[1]]
    # the first 3, 2 or 1 of each kind: the line stays near 300 characters
    limit, width = {1: (4, 200), 2: (3, 110)}.get(len(kinds), (2, 100))
    problems = [f"{what}: {listing(items, limit, sep=sep, width=width)}" for what, items, sep in kinds]
    if problems:
        raise CheckpointError(f"{folder}: params do not match config.json: " + " | ".join(problems))
    return stored


def stored_tree(stored: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict:
    """What `stored_params` or `check_params` returned, as a tree of ShapeDtypeStructs: the
    layout the stored params have (packed leaves included), for sharding them before they load."""
    return unflatten({k: jax.ShapeDtypeStruct(shape, dt) for k, (shape, dt) in stored.items()})


def load_params(folder: str | Path, config: Qwen2VLConfig, dtype=None, shardings=None, *,
                stored: dict | None = None) -> dict:
    """Restores `folder/params` as a nested dict of jax arrays.

    dtype: the arrays' dtype (cast on restore); None keeps the stored dtype.
    shardings: None (default device), one `jax.sharding.Sharding` for every parameter, or a
      tree like the params (e.g. from `sharding.param_shardings`); each array is restored
      straight into its sharding, never gathered on one host first.
    stored: what `check_params(folder, config)` returned, when the caller has checked already.
    """
    folder = Path(folder).resolve()
    if stored is None:
        stored = check_params(folder, config)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = dict.fromkeys(stored, shardings or default)
    else:
        flat_shardings = flatten(shardings)
        absent = sorted(set(stored) - set(flat_shardings))
        if absent:
            raise CheckpointError(f"shardings lack {len(absent)} parameter(s): " + listing(absent))
    def cast(path, stored_dtype):  # packed leaves (integers and their scales) stay as stored
        packed = path.rpartition("/")[2] in PACKED_PARTS
        return stored_dtype if dtype is None or packed else jnp.dtype(dtype)

    abstract = {
        k: jax.ShapeDtypeStruct(shape, cast(k, stored_dtype), sharding=flat_shardings[k])
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



def load_hf_params(path: str | Path, config: Qwen2VLConfig, dtype, host: bool = False,
                   shapes: dict | None = None) -> dict:
    """HF safetensors in `path` -> nested param dict (names and shapes checked against
    `config`); host=True keeps numpy arrays (for placing on a mesh without a one-device copy);
    shapes: the config's `init_shapes` tree, when the caller has it."""
    expected = expected_shapes(config, shapes)
    flat = convert_tensors(
        list_tensors(Path(path)), expected, tie_word_embeddings=config.tie_word_embeddings,
        cast=(lambda a: np.asarray(a, dtype)) if host else (lambda a: jnp.asarray(a, dtype)),
    )
    return unflatten(flat)
