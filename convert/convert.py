"""HF checkpoint folder (or hub repo id) -> converted folder, streaming.

Order of work, so that bad input costs nothing and leaves nothing:
1. resolve the source (a local folder, else a hub repo id fetched with huggingface_hub);
2. refuse an OUT_DIR that exists and is not empty (unless `force`), that is or holds the
   source, or that lies inside it;
3. read config.json, list every tensor from the safetensors headers, check the files' byte
   ranges and map every name and shape onto the config's parameters (one error lists all);
4. only then write, into a temporary sibling of OUT_DIR: tensors are read (memory-mapped),
   transposed, cast and handed to Orbax one layer at a time; the sibling is renamed to OUT_DIR
   at the end, and removed on any failure or interrupt.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

from qwen2vl_jax import checkpoint, interrupts
from qwen2vl_jax.config import DEMO_DIR, Qwen2VLConfig
from qwen2vl_jax.convert import gptq
from qwen2vl_jax.errors import CheckpointError, InputError, first_line, listing, refuse_inside
from qwen2vl_jax.hf_mapping import Planned, hf_to_jax_name, load_planned, plan_conversion
from qwen2vl_jax.quant.format import Scheme
from qwen2vl_jax.quant.quantize import quantize_leaf
from qwen2vl_jax.safetensors_io import DTYPES, checkpoint_files, list_tensors, read_header

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors names (bfloat16's numpy kind is 'V', not 'f')

OUTPUT_DTYPES = ("bfloat16", "float32")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken", "*.md", "LICENSE*"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


# ---------------------------------------------------------------- source and destination
def resolve_source(source: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a hub repo id downloaded with huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{source} is a file, not a checkpoint folder")
    name = str(source)
    if not _REPO_ID.fullmatch(name) or ".." in name:
        raise InputError(f"no such folder: {source}")
    try:
        import huggingface_hub
    except ImportError:
        raise InputError(f"{source} is not a local folder, and huggingface_hub is not installed to fetch it") from None
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ... : all one line for the user
        raise CheckpointError(
            f"{source} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {first_line(e, 200)})"
        ) from None


def check_destination(out: Path, sources: list[Path], force: bool, out_name: str = "OUT_DIR",
                      source_name: str = "HF_DIR") -> None:
    """Refuses an output folder that would clobber data: the source, inside the source (as
    qwen2vl-train refuses an --out inside its --model), holding the source, or non-empty
    without force. out_name, source_name: what the usage calls them, for the error line."""
    out_r = out.resolve()
    for src in sources:
        refuse_inside(out, out_name, src, source_name)
        if out_r in src.resolve().parents:
            raise InputError(f"{out_name} {out} would overwrite the input {src}, which is inside it")
    if out.exists() and not force:
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder (pass --force to replace it)")
        if any(out.iterdir()):
            raise InputError(f"{out} exists and is not empty (pass --force to replace it)")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out` to write into; renamed to `out` on success, removed on
    any failure (KeyboardInterrupt included), so `out` is either whole or untouched.

    Ctrl-C and SIGTERM are held inside (see interrupts.py): the body calls
    `interrupts.check()` between units of work, so an interrupt stops it between Orbax
    operations, never while Orbax's background threads still write into the folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise InputError(f"cannot create {out}: {e.strerror or e}") from None
    with interrupts.held():
        try:
            yield tmp
            interrupts.check()  # the last point where stopping leaves nothing
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
            if out.exists() or out.is_symlink():
                old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
                out.rename(old)
                tmp.rename(out)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            else:
                tmp.rename(out)
        except BaseException:
            with interrupts.shielded():
                remove_tree(tmp)
            raise


def remove_tree(path: Path, settle: float = 0.05, tries: int = 20) -> None:
    """Removes `path` and checks it stays gone: a writer thread that outlived an interrupt
    (one that cut short the wait for it) could recreate part of it."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle)
        if not os.path.lexists(path):
            return


# ---------------------------------------------------------------- checks
def check_files(folder: Path) -> None:
    """Every safetensors header parses, every dtype is known, every byte range fits its shape
    and its file; all problems in one error (grouped by file and kind, the first few tensors
    of each named), before anything is written."""
    groups: dict[tuple[str, str], list[str]] = {}  # (file, what is wrong) -> tensors

    def bad(path: Path, name: str, what: str) -> None:
        groups.setdefault((path.name, what), []).append(name)

    for path in checkpoint_files(folder):
        header, start = read_header(path)
        size = path.stat().st_size
        for name, info in header.items():
            try:
                dtype = DTYPES.get(info["dtype"])
                begin, end = info["data_offsets"]
                shape = tuple(info["shape"])
                if not all(type(x) is int and x >= 0 for x in (begin, end, *shape)):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                bad(path, name, "malformed header entry")
                continue
            if dtype is None:
                bad(path, name, f"unsupported dtype {info['dtype']}")
            elif info["dtype"] not in FLOAT_DTYPES and hf_to_jax_name(name) is not None:
                bad(path, name, f"dtype {info['dtype']} where a floating-point weight belongs")
            elif end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                bad(path, f"{name} {shape}", "byte range does not match the shape")
            elif start + end > size:
                bad(path, name, "data runs past the end of the file (truncated?)")
    if groups:
        count = sum(map(len, groups.values()))
        # the first 3, 2 or 1 tensors of each kind: the line stays near 300 characters
        limit, width = {1: (4, 160), 2: (3, 90)}.get(len(groups), (2, 60))
        parts = [f"{file}: {listing(names, limit, width=width)}: {what}" for (file, what), names in groups.items()]
        raise CheckpointError(f"{count} bad tensor(s) in {folder}: {listing(parts, 3, sep='; ', width=1000)}")


def _no_safetensors_hint(folder: Path) -> None:
    if not list(folder.glob("*.safetensors")) and not (folder / "model.safetensors.index.json").exists():
        if checkpoint.is_converted(folder):
            raise CheckpointError(
                f"{folder} is already converted (it holds {checkpoint.MARKER} and {checkpoint.PARAMS}/): "
                "qwen2vl-generate --model and Qwen2VL.from_pretrained load it as it is, and "
                "qwen2vl-export turns it back into an HF folder; --quantize int8|int4 is what takes a "
                "converted folder (it writes a quantized copy)"
            )
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if other:
            raise CheckpointError(
                f"{folder} holds only {other[0]}-style weights; convert them to safetensors first "
                "(only safetensors are read)"
            )


def plan(folder: Path, config: Qwen2VLConfig, dtype=np.float32, keep: dict | None = None) -> list[Planned]:
    """Every tensor of the checkpoint, checked against the config; loads no tensor data.
    GPTQ/AWQ layers become float kernels in `dtype`, dequantized when loaded, or with `keep`
    (a dict) stay packed: keep[hf_name] loads their packed leaves (see gptq.py)."""
    packing = gptq.read_quantization(folder)
    _no_safetensors_hint(folder)
    check_files(folder)
    expected = checkpoint.expected_shapes(config)
    tensors, problems = list_tensors(folder), []
    if packing is not None:
        tensors, problems = gptq.fold(tensors, expected, packing, dtype, keep)
    return plan_conversion(tensors, expected, tie_word_embeddings=config.tie_word_embeddings,
                           mismatched=problems)


def group_of(path: str) -> str:
    """The streaming unit: one vision block, one decoder layer, or one other module."""
    return "/".join(path.split("/")[:2])


def groups(items: list[Planned]) -> list[list[Planned]]:
    out: dict[str, list[Planned]] = {}
    for item in items:
        out.setdefault(group_of(item.path), []).append(item)
    return list(out.values())


# ---------------------------------------------------------------- the conversion
def convert_checkpoint(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Converts an HF Qwen2-VL checkpoint to a converted folder at `out_dir`; returns it.

    dtype: 'bfloat16' (None: the default) or 'float32', the stored dtype of the float
      parameters. A GPTQ/AWQ checkpoint stays packed unless a dtype is given: then it is
      dequantized to float.
    quantize: 'int8' or 'int4' packs the decoder's linear layers and the output head of a
      float checkpoint (qwen2vl_jax.quant.quantize; the scheme is recorded in qwen2vl_jax.json).
    force: replace an existing non-empty `out_dir` (only once the new one is complete).
    Raises InputError/CheckpointError (one line) with nothing written.
    """
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, not {dtype!r}")
    scheme = None if quantize is None else Scheme.of(quantize)
    np_dtype = np.dtype(np.float32 if dtype == "float32" else DTYPES["BF16"])
    out = Path(out_dir).expanduser()
    local = Path(source).expanduser()
    if local.is_dir() and scheme is not None and checkpoint.is_converted(local):
        return quantize_converted(local, out, scheme, force=force, progress=progress)
    if local.is_dir():  # refuse a converted folder, and a bad OUT_DIR, before any download
        _no_safetensors_hint(local)
        check_destination(out, [local], force)
    src = resolve_source(source)
    check_destination(out, [src], force)

    config = checkpoint.read_config(src)
    packing = gptq.read_quantization(src)
    if packing is not None and scheme is not None:
        raise InputError(f"{source} is already {packing.method.upper()}-quantized; --quantize takes a float "
                         "checkpoint (convert it as it is, or with --dtype to dequantize it)")
    keep: dict | None = {} if packing is not None and dtype is None else None
    if keep is not None:
        scheme = Scheme(packing.method, packing.bits, packing.group_size, head=False)
    items = plan(src, config, np_dtype, keep)

    from tqdm import tqdm

    with staging(out) as tmp:
        checkpoint.copy_side_files(src, tmp)
        gptq.strip_quantization(tmp / "config.json")  # the scheme, if any, is in qwen2vl_jax.json
        writer = checkpoint.ParamWriter(tmp)
        with tqdm(total=len(items), desc="converting", unit="tensor", disable=not progress) as bar:
            for group in groups(items):
                interrupts.check()
                flat = {}
                for item in group:
                    flat.update(_converted(item, np_dtype, scheme, keep))
                    bar.update(1)
                writer.write(flat)
                del flat
        writer.finalize()
        extra = {} if scheme is None else {"quantization": scheme.to_json()}
        if keep is not None:  # the float tensors' own dtype
            np_dtype = next((i.load().dtype for i in items if i.hf_name not in keep), np_dtype)
        checkpoint.write_marker(tmp, np_dtype, source=str(source), **extra)
    return out


def quantize_converted(src: Path, out: Path, scheme: Scheme, *, force: bool = False,
                       progress: bool = True) -> Path:
    """A converted float folder (from qwen2vl-convert or training) -> the same model with the
    scheme's weights packed, streamed one layer at a time like a conversion."""
    check_destination(out, [src], force)
    if checkpoint.read_scheme(src) is not None:
        raise InputError(f"{src} is already quantized ({checkpoint.read_scheme(src).method}); "
                         "--quantize takes a float model")
    config = checkpoint.read_config(src)
    stored = checkpoint.check_params(src, config)
    dtypes = {dt for _, dt in stored.values()}
    from tqdm import tqdm

    with staging(out) as tmp:
        checkpoint.copy_side_files(src, tmp)
        writer = checkpoint.ParamWriter(tmp)
        by_group: dict[str, list[str]] = {}
        for path in stored:
            by_group.setdefault(group_of(path), []).append(path)
        with tqdm(total=len(stored), desc="quantizing", unit="tensor", disable=not progress) as bar:
            for paths in by_group.values():
                interrupts.check()
                flat = {}
                for path, array in checkpoint.load_numpy(src, paths).items():
                    packed = quantize_leaf(path, array, scheme)
                    head = path.rpartition("/")[0]
                    flat.update({path: array} if packed is None else {f"{head}/{k}": v for k, v in packed.items()})
                    bar.update(1)
                writer.write(flat)
        writer.finalize()
        dtype = dtypes.pop() if len(dtypes) == 1 else np.float32
        checkpoint.write_marker(tmp, dtype, source=str(src), quantization=scheme.to_json())
    return out


def _converted(item: Planned, dtype, scheme: Scheme | None, keep: dict | None) -> dict[str, np.ndarray]:
    """One planned tensor -> {path: array}: a float parameter in `dtype`, or a packed layer's
    leaves (kept from a GPTQ/AWQ checkpoint, or quantized from the float weight)."""
    head = item.path.rpartition("/")[0]
    if keep is not None and item.hf_name in keep:
        return {f"{head}/{k}": v for k, v in keep[item.hf_name]().items()}
    array = load_planned(item)
    if scheme is not None and keep is None:
        packed = quantize_leaf(item.path, array, scheme)
        if packed is not None:
            return {f"{head}/{k}": v for k, v in packed.items()}
    if keep is not None:  # a packed checkpoint's float tensors (fp16 in GPTQ/AWQ releases) stay as they are
        return {item.path: array}
    return {item.path: array.astype(dtype, copy=False)}


def model_folder(name: str | os.PathLike, work_dir: str | os.PathLike = "~/.cache/qwen2vl-jax",
                 dtype: str | None = None) -> Path:
    """What a user names -> a folder to load: "demo" -> the shipped demo model; a local folder
    (converted or HF) -> itself; anything else is a hub id (Qwen/Qwen2-VL-2B-Instruct),
    downloaded and converted once into work_dir/<name>-jax (later calls reuse it)."""
    if str(name) == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise CheckpointError(f"the demo model is not in this install ({DEMO_DIR} has no config.json)")
        return DEMO_DIR
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    out = Path(work_dir).expanduser() / (str(name).rstrip("/").split("/")[-1] + "-jax")
    if not checkpoint.is_converted(out):
        convert_checkpoint(str(name), out, dtype=dtype, force=True)
    return out
