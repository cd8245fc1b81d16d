"""qwen2vl-convert / qwen2vl-export: both naming schemes, both config layouts, sharded and single
files, tied and untied; logits parity with HF (fp32), bit-exact round trips, and every bad
input refused with one clear line and nothing left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import hf_utils
from hf_utils import SIDE, add_side_files, read_all, to_tf5_name, write_folder
from qwen2vl_jax import checkpoint
from qwen2vl_jax.errors import first_line
from qwen2vl_jax.convert import convert as convert_lib
from qwen2vl_jax.convert.cli import convert_main, export_main
from qwen2vl_jax.convert.convert import convert_checkpoint
from qwen2vl_jax.convert.export import export_checkpoint
from qwen2vl_jax.hf_mapping import hf_to_jax_name, to_jax
from qwen2vl_jax.params import flatten
from qwen2vl_jax.safetensors_io import read_header, save_file
from qwen2vl_jax.errors import CheckpointError, InputError

torch = pytest.importorskip("torch")

CASE = {c.name: c for c in hf_utils.standard_cases()}["left_padded_batch"]


# ---------------------------------------------------------------- building HF folders
def flat_config(folder: Path) -> dict:
    """The published (flat, transformers 4) config.json layout for a saved tiny model."""
    from qwen2vl_jax.config import Qwen2VLConfig

    raw = Qwen2VLConfig.from_hf(folder).to_hf()
    raw["torch_dtype"] = "float32"
    return raw


@pytest.fixture(scope="module")
def variants(tiny_hf, tmp_path_factory):
    """name -> (model name, HF folder). Each covers one naming scheme x config layout x files."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    untied_model, untied_dir = tiny_hf["untied"]
    tied_model, tied_dir = tiny_hf["tied"]
    nested = lambda d: json.loads((d / "config.json").read_text())  # noqa: E731
    # transformers 5.24 save_pretrained: published names, nested config, one file.
    d = shutil.copytree(untied_dir, root / "u")
    out["untied-published-nested-single"] = ("untied", add_side_files(Path(d)))
    # transformers 5 names, nested config, our writer, 3 shards + index.
    out["untied-tf5-nested-sharded"] = ("untied", write_folder(
        root / "a", {to_tf5_name(k): v for k, v in read_all(untied_dir).items()}, nested(untied_dir), shards=3))
    # Published release: published names, flat config, save_pretrained's own shards.
    d = root / "b"
    tied_model.save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) >= 2
    (d / "config.json").write_text(json.dumps(flat_config(tied_dir)))
    add_side_files(d)
    out["tied-published-flat-sharded"] = ("tied", d)
    # transformers 5 names, flat config, one file; this tied one also stores lm_head (a copy of
    # the embedding, as some savers write), which tied conversion ignores.
    t = {to_tf5_name(k): v for k, v in read_all(tied_dir).items()}
    t["lm_head.weight"] = t["model.language_model.embed_tokens.weight"].copy()
    out["tied-tf5-flat-single"] = ("tied", write_folder(root / "c", t, flat_config(tied_dir)))
    return out


_REF: dict[str, np.ndarray] = {}


def hf_logits(model, key: str) -> np.ndarray:
    if key not in _REF:
        with torch.no_grad():
            _REF[key] = model(**CASE.torch_inputs()).logits.numpy()
    return _REF[key]


def assert_nothing_left(out: Path) -> None:
    assert not out.exists() and not out.is_symlink(), f"{out} was written"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


# ---------------------------------------------------------------- parity and round trips
@pytest.mark.parametrize("variant", [
    "untied-published-nested-single", "untied-tf5-nested-sharded",
    "tied-published-flat-sharded", "tied-tf5-flat-single",
])
def test_convert_load_matches_hf_logits(tiny_hf, variants, tmp_path, variant, capsys):
    from qwen2vl_jax.api import Qwen2VL

    model_name, src = variants[variant]
    hf_model, _ = tiny_hf[model_name]
    out = tmp_path / "jax"
    assert convert_main([str(src), str(out), "--dtype", "float32", "--quiet"]) == 0
    # These folders carry no tokenizer: the CLI says so, even with --quiet.
    assert capsys.readouterr().err == (f"note: the checkpoint had no tokenizer files (tokenizer.json, or vocab.json "
                                       f"+ merges.txt); copy them into {out} before generating with it\n")
    assert checkpoint.is_converted(out)
    for name, text in SIDE.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("*.safetensors"))

    ours = Qwen2VL.from_pretrained(out, dtype="float32")
    flat = flatten(ours.params)
    assert ("lm_head/kernel" in flat) == (model_name == "untied")
    # Every parameter is the HF tensor, moved to the JAX layout, bit for bit.
    for name, value in hf_model.state_dict().items():
        mapped = hf_to_jax_name(name)
        if mapped is None or mapped[0] not in flat:
            assert name == "lm_head.weight" and model_name == "tied", name
            continue
        want = to_jax(value.numpy(), mapped[1], flat[mapped[0]].shape)
        np.testing.assert_array_equal(np.asarray(flat[mapped[0]]), want, err_msg=name)

    ref = hf_logits(hf_model, model_name)
    mine = ours.logits(**CASE.inputs())
    hf_utils.assert_logits_close(mine, ref, CASE.attention_mask)


@pytest.mark.parametrize("variant", ["untied-tf5-nested-sharded", "tied-published-flat-sharded"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(tiny_hf, variants, tmp_path, variant):
    from transformers import Qwen2VLForConditionalGeneration

    model_name, src = variants[variant]
    hf_model, published_dir = tiny_hf[model_name]
    jax_dir, back = tmp_path / "jax", tmp_path / "hf"
    convert_checkpoint(src, jax_dir, dtype="float32", progress=False)
    assert export_main([str(jax_dir), str(back), "--max-shard-size", "30KB", "--quiet"]) == 0

    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    original = read_all(published_dir)  # published names, as HF saved them
    exported = read_all(back)
    assert set(exported) == set(original)
    for name, array in original.items():
        assert exported[name].dtype == array.dtype and exported[name].shape == array.shape, name
        assert exported[name].tobytes() == array.tobytes(), name

    reloaded = Qwen2VLForConditionalGeneration.from_pretrained(back).eval()
    assert reloaded.dtype == torch.float32
    with torch.no_grad():
        again = reloaded(**CASE.torch_inputs()).logits.numpy()
    np.testing.assert_array_equal(again, hf_logits(hf_model, model_name))


def test_default_dtype_is_bfloat16_rounded_like_torch(tiny_hf, tmp_path):
    hf_model, src = tiny_hf["untied"]
    out = tmp_path / "jax"
    convert_checkpoint(src, out, progress=False)
    assert checkpoint.read_marker(out)["dtype"] == "bfloat16"
    stored = checkpoint.stored_params(out)
    assert {dt for _, dt in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
    arrays = checkpoint.load_numpy(out, list(stored))
    for name, value in hf_model.state_dict().items():
        path, transform = hf_to_jax_name(name)
        want = to_jax(value.to(torch.bfloat16).view(torch.int16).numpy(), transform, stored[path][0])
        np.testing.assert_array_equal(arrays[path].view(np.int16), want, err_msg=name)
    # Export keeps bf16 and says so in config.json.
    back = tmp_path / "hf"
    export_checkpoint(out, back, progress=False)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    assert {a.dtype for a in read_all(back).values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_bf16_and_f16_sources_convert(tiny_hf, tmp_path):
    """The published checkpoints are bf16 on disk (the GPTQ ones f16): both convert, exactly."""
    import copy

    hf_model, _ = tiny_hf["tied"]
    for torch_dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16")):
        src = tmp_path / f"hf_{name}"
        low = copy.deepcopy(hf_model).to(torch_dtype)
        low.save_pretrained(src)
        assert {info["dtype"] for info in read_header(src / "model.safetensors")[0].values()} == {name}
        out = tmp_path / f"jax_{name}"
        convert_checkpoint(src, out, dtype="float32", progress=False)
        stored = checkpoint.stored_params(out)
        arrays = checkpoint.load_numpy(out, list(stored))
        for key, value in low.state_dict().items():
            path, transform = hf_to_jax_name(key)
            if path == "lm_head/kernel":
                continue  # tied to the embedding, which is compared
            want = to_jax(value.float().numpy(), transform, stored[path][0])
            np.testing.assert_array_equal(arrays[path], want, err_msg=key)


def test_load_params_casts_and_places_on_given_shardings(tiny_hf, tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from qwen2vl_jax.config import Qwen2VLConfig

    _, src = tiny_hf["tied"]
    out = tmp_path / "jax"
    convert_checkpoint(src, out, progress=False)  # bf16 on disk
    config = Qwen2VLConfig.from_hf(out)
    mesh = Mesh(np.array(jax.devices()), ("x",))
    replicated = NamedSharding(mesh, P())
    params = checkpoint.load_params(out, config, "float32", shardings=replicated)
    leaves = flatten(params)
    assert all(v.dtype == np.float32 and v.sharding == replicated for v in leaves.values())
    # A tree of shardings, one per parameter: the embedding's columns (48) split over the devices
    # (one CPU device in this process, so this checks that a per-parameter tree is honoured;
    # test_sharding.py restores params really split over 8 devices).
    cols = NamedSharding(mesh, P(None, "x"))
    assert 48 % len(jax.devices()) == 0
    tree = {k: (cols if k == "model/embed_tokens/embedding" else replicated) for k in leaves}
    from qwen2vl_jax.params import unflatten

    params = checkpoint.load_params(out, config, None, shardings=unflatten(tree))
    emb = params["model"]["embed_tokens"]["embedding"]
    assert emb.dtype == ml_dtypes.bfloat16 and emb.sharding == tree["model/embed_tokens/embedding"]
    np.testing.assert_array_equal(np.asarray(emb, np.float32),
                                  np.asarray(leaves["model/embed_tokens/embedding"]))


def test_save_params_round_trip(tmp_path):
    import jax.numpy as jnp

    from qwen2vl_jax.config import TINY

    shapes = checkpoint.expected_shapes(TINY)
    rng = np.random.default_rng(0)
    flat = {k: jnp.asarray(rng.standard_normal(s, np.float32)) for k, s in shapes.items()}
    from qwen2vl_jax.params import unflatten

    folder = tmp_path / "trained"
    checkpoint.save_params(unflatten(flat), folder)
    (folder / "config.json").write_text(json.dumps(TINY.to_hf()))
    assert checkpoint.is_converted(folder)
    back = flatten(checkpoint.load_params(folder, TINY))
    assert set(back) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(flat[k]))


# ---------------------------------------------------------------- bad input
def _tweaked(src: Path, dst: Path, tensors=None, config=None) -> Path:
    t = read_all(src) if tensors is None else tensors
    return write_folder(dst, t, config or json.loads((src / "config.json").read_text()))


def test_every_mapping_problem_in_one_error(tiny_hf, tmp_path):
    _, src = tiny_hf["untied"]
    t = read_all(src)
    t["model.layers.0.mlp.extra_proj.weight"] = np.zeros((3, 3), np.float32)
    del t["model.layers.1.mlp.up_proj.weight"]
    t["visual.blocks.0.attn.qkv.weight"] = np.ascontiguousarray(t["visual.blocks.0.attn.qkv.weight"].T)
    bad = _tweaked(src, tmp_path / "bad", t)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(bad, out, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 unmapped tensor(s): model.layers.0.mlp.extra_proj.weight" in msg
    assert "1 parameter(s) missing from the checkpoint: model/layers_1/mlp/up_proj/kernel" in msg
    assert "1 shape mismatch(es): visual.blocks.0.attn.qkv.weight: checkpoint shape (36, 108)" in msg
    assert_nothing_left(out)


def test_config_that_does_not_match_the_weights_is_refused(tiny_hf, tmp_path):
    _, src = tiny_hf["untied"]
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96  # the weights say 97
    bad = _tweaked(src, tmp_path / "bad", config=cfg)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"6 shape mismatch\(es\): .*mlp.*config expects"):
        convert_checkpoint(bad, out, progress=False)
    assert_nothing_left(out)


@pytest.mark.parametrize("problem,pattern", [
    ("no_config", "(no config.json|config.json: no such file)"),
    ("invalid_config", "invalid config"),
    ("missing_shard", "index names missing shard"),
    ("truncated", "runs past the end of the file"),
    ("bin_only", "only safetensors are read"),
])
def test_bad_folders_are_refused_before_writing(tiny_hf, tmp_path, problem, pattern):
    _, src = tiny_hf["untied"]
    bad = tmp_path / "bad"
    if problem == "bin_only":
        bad.mkdir()
        shutil.copy(src / "config.json", bad)
        (bad / "pytorch_model.bin").write_bytes(b"\0" * 16)
    else:
        write_folder(bad, read_all(src), json.loads((src / "config.json").read_text()),
                     shards=2 if problem == "missing_shard" else 1)
    if problem == "no_config":
        (bad / "config.json").unlink()
    elif problem == "invalid_config":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["text_config"]["num_attention_heads"] = 7  # 60 is not divisible by 7
        (bad / "config.json").write_text(json.dumps(cfg))
    elif problem == "missing_shard":
        next(bad.glob("model-00002-*.safetensors")).unlink()
    elif problem == "truncated":
        f = bad / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=pattern) as err:
        convert_checkpoint(bad, out, progress=False)
    assert "\n" not in str(err.value)
    assert_nothing_left(out)


def test_listing_names_the_first_few_and_counts_the_rest():
    from qwen2vl_jax.errors import listing

    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(36)]
    assert listing(names) == f"{names[0]}, {names[1]}, {names[2]} and 33 more"
    assert listing(names[:4]) == ", ".join(names[:4])  # as many as the limit: all of them
    assert listing(names[:5], 3) == f"{names[0]}, {names[1]} and 3 more"  # never "and 1 more"
    assert listing(names, 4, width=80) == f"{names[0]}, {names[1]} and 34 more"  # what fits in width
    assert listing(["x" * 500]) == "x" * 197 + "..."
    assert listing(["a; b", "c"], sep="; ") == "a; b; c"


def _long_lines_case(tiny_hf, tmp_path, what: str):
    _, src = tiny_hf["untied"]
    config = json.loads((src / "config.json").read_text())
    if what == "truncated file":
        bad = write_folder(tmp_path / "cut", read_all(src), config)
        f = bad / "model.safetensors"
        header, start = read_header(f)
        keep = f.stat().st_size // 2
        cut = sorted(n for n, info in header.items() if start + info["data_offsets"][1] > keep)
        f.write_bytes(f.read_bytes()[:keep])
        head = re.escape(f"{len(cut)} bad tensor(s) in {bad}: model.safetensors: ")
        return bad, len(cut), (head + rf"{re.escape(cut[0])}, [\w.]+, [\w.]+ and {len(cut) - 3} more: data runs past "
                               r"the end of the file \(truncated\?\)")
    if what == "more layers in the config":
        config["text_config"]["num_hidden_layers"] += 3
        config["vision_config"]["depth"] += 1
        bad = _tweaked(src, tmp_path / "deeper", config=config)
        n = 3 * 12 + 12
        head = re.escape(f"checkpoint does not match its config: {n} parameter(s) missing from the checkpoint: ")
        return bad, n, head + rf"model/layers_2/[\w/]+, [\w/]+, [\w/]+ and {n - 3} more"
    t = read_all(src)  # every decoder weight transposed, every vision weight renamed
    for name in [n for n in t if n.startswith("model.layers.") and n.endswith("proj.weight")]:
        t[name] = np.ascontiguousarray(t[name].T)
    for name in [n for n in t if n.startswith("visual.blocks.")]:
        t[name.replace("visual.blocks.", "visual.block.")] = t.pop(name)
    bad = _tweaked(src, tmp_path / "everything", t)
    head = re.escape("checkpoint does not match its config: ")
    return bad, None, (head + r"24 unmapped tensor\(s\): visual\.block\.0\.[\w.]+ and 23 more \| 24 parameter\(s\) "
                       r"missing from the checkpoint: visual/blocks_0/[\w/]+ and 23 more \| 10 shape mismatch\(es\): "
                       r"model\.layers\.0\.[\w.]+: checkpoint shape \(\d+, \d+\), config expects \(\d+, \d+\) "
                       r"and 9 more")


@pytest.mark.parametrize("what", ["truncated file", "more layers in the config", "three kinds at once"])
def test_long_listings_are_one_short_line(tiny_hf, tmp_path, capsys, what):
    """A checkpoint with dozens of bad tensors (a truncated file, a config with more layers, a
    mix of kinds) is refused with one line of under 300 characters: each kind counted, its
    first few named."""
    bad, count, pattern = _long_lines_case(tiny_hf, tmp_path, what)
    out = tmp_path / "out"
    assert convert_main([str(bad), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    longest = 345 if count is None else 300  # three kinds of problem: one name of each
    assert err.count("\n") == 1 and len(err) < longest, (len(err), err)
    assert re.fullmatch("qwen2vl-convert: error: " + pattern, err.strip()), err
    assert count is None or count > 20
    assert_nothing_left(out)


def test_stored_params_and_sharding_rules_list_few(tiny_hf, tmp_path):
    """The other listings: stored params against a config with more layers, and parameters
    no sharding rule covers."""
    from qwen2vl_jax.sharding import param_logical_axes

    _, src = tiny_hf["untied"]
    out = tmp_path / "jax"
    convert_checkpoint(src, out, dtype="float32", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] += 4
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        checkpoint.check_params(out, checkpoint.read_config(out))
    msg = str(err.value)
    assert re.fullmatch(re.escape(f"{out}: params do not match config.json: 48 parameter(s) missing: ")
                        + r"model/layers_\d+/[\w/]+, model/layers_\d+/[\w/]+, model/layers_\d+/[\w/]+ and 45 more",
                        msg), msg
    assert len(msg) < 300
    with pytest.raises(ValueError) as err:
        param_logical_axes({f"extra_{i:02d}": {"kernel": np.zeros((2, 2))} for i in range(30)})
    assert str(err.value) == ("no sharding rule for 30 parameter(s): extra_00/kernel, extra_01/kernel, extra_02/kernel "
                              "and 27 more")


def test_a_converted_folder_is_not_converted_again(tmp_path, capsys):
    """Converting a folder qwen2vl-convert wrote says so, and what reads it as it is."""
    from qwen2vl_jax.config import DEMO_DIR

    out = tmp_path / "out"
    assert convert_main([str(DEMO_DIR), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"qwen2vl-convert: error: {DEMO_DIR} is already converted (it holds qwen2vl_jax.json and params/): "
                   "qwen2vl-generate --model and Qwen2VL.from_pretrained load it as it is, and qwen2vl-export turns "
                   "it back into an HF folder; --quantize int8|int4 is what takes a converted folder (it writes a "
                   "quantized copy)\n")
    assert_nothing_left(out)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")  # said before any complaint about OUT_DIR
    with pytest.raises(CheckpointError, match="is already converted"):
        convert_checkpoint(DEMO_DIR, tmp_path / "taken", progress=False)


def test_existing_out_dir_needs_force_and_is_replaced_whole(tiny_hf, tmp_path):
    _, src = tiny_hf["tied"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not empty"):
        convert_checkpoint(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # An empty folder is fine; --force replaces a full one.
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(src, empty, dtype="float32", progress=False)
    assert checkpoint.is_converted(empty)
    convert_checkpoint(src, out, dtype="float32", force=True, progress=False)
    assert checkpoint.is_converted(out) and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(InputError, match="would overwrite the input"):
        convert_checkpoint(src, src, force=True, progress=False)
    with pytest.raises(InputError, match="would overwrite the input"):
        convert_checkpoint(src, src.parent, force=True, progress=False)


def test_an_output_inside_the_source_is_refused(tiny_hf, tmp_path, capsys):
    """convert, export and convert --quantize refuse an output folder inside their input, as
    qwen2vl-train refuses an --out inside its --model: one line naming both, status 2, nothing
    written (the input's files are as they were)."""
    _, shared = tiny_hf["tied"]
    src = tmp_path / "hf"
    shutil.copytree(shared, src)
    jax_dir = tmp_path / "jax"
    assert convert_main([str(src), str(jax_dir), "--dtype", "float32", "--quiet"]) == 0
    capsys.readouterr()
    cases = [
        ("qwen2vl-convert", convert_main, [str(src), str(src / "jax")],
         f"OUT_DIR {src / 'jax'} is inside the HF_DIR folder {src}"),
        ("qwen2vl-convert", convert_main, [str(jax_dir), str(jax_dir / "int8"), "--quantize", "int8"],
         f"OUT_DIR {jax_dir / 'int8'} is inside the HF_DIR folder {jax_dir}"),
        ("qwen2vl-export", export_main, [str(jax_dir), str(jax_dir / "hf")],
         f"HF_DIR {jax_dir / 'hf'} is inside the MODEL_DIR folder {jax_dir}"),
        ("qwen2vl-export", export_main, [str(jax_dir), str(jax_dir / "deeper" / "hf"), "--force"],
         f"HF_DIR {jax_dir / 'deeper' / 'hf'} is inside the MODEL_DIR folder {jax_dir}"),
        ("qwen2vl-export", export_main, [str(jax_dir), str(jax_dir), "--force"],
         f"HF_DIR {jax_dir} is the MODEL_DIR folder; writing it would overwrite the input"),
    ]
    before = {folder: tree(folder) for folder in (src, jax_dir)}
    for prog, main, argv, says in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and captured.err.startswith(f"{prog}: error: {says}"), captured.err
        assert captured.out == ""
    assert {folder: tree(folder) for folder in (src, jax_dir)} == before


def tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def test_quiet_keeps_the_line_that_says_what_was_written(tiny_hf, tmp_path, capsys):
    """--quiet hides the progress bars (stderr); `wrote OUT` is the result, on stdout either way."""
    _, src = tiny_hf["tied"]
    for quiet in ([], ["--quiet"]):
        out, back = tmp_path / f"jax{len(quiet)}", tmp_path / f"hf{len(quiet)}"
        assert convert_main([str(src), str(out), "--dtype", "float32", *quiet]) == 0
        assert capsys.readouterr().out == f"wrote {out}\n"
        assert export_main([str(out), str(back), *quiet]) == 0
        captured = capsys.readouterr()
        assert captured.out == f"wrote {back}\n"
        assert ("exporting" in captured.err) != bool(quiet)


def test_export_names_its_arguments_for_what_they_are(capsys):
    """The usage calls the input MODEL_DIR (the folder qwen2vl-convert or qwen2vl-train wrote)
    and the output HF_DIR, and so do the help and the errors."""
    with pytest.raises(SystemExit):
        export_main(["--help"])
    text = capsys.readouterr().out
    usage = " ".join(text.split("\n\n")[0].split())
    assert usage.endswith("MODEL_DIR HF_DIR"), usage
    with pytest.raises(SystemExit) as exit_:
        export_main([])
    assert exit_.value.code == 2
    assert "the following arguments are required: MODEL_DIR, HF_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    assert " ".join(capsys.readouterr().out.split("\n\n")[0].split()).endswith("HF_DIR OUT_DIR")


@pytest.mark.parametrize("prog", ["qwen2vl-convert", "qwen2vl-export", "qwen2vl-train"])
def test_every_cli_prints_its_version(capsys, prog):
    """`--version` prints `PROG VERSION` (the installed package's) and exits 0, required
    arguments or not."""
    import importlib.metadata

    main = {"qwen2vl-convert": convert_main, "qwen2vl-export": export_main, "qwen2vl-train": _train_main}[prog]
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"{prog} {importlib.metadata.version('qwen2vl-jax')}\n"


def test_interrupted_conversion_leaves_nothing(tiny_hf, tmp_path, monkeypatch):
    _, src = tiny_hf["untied"]
    calls = []
    real_write = checkpoint.ParamWriter.write

    def write_then_interrupt(self, flat):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(self, flat)

    monkeypatch.setattr(checkpoint.ParamWriter, "write", write_then_interrupt)
    out = tmp_path / "out"
    assert convert_main([str(src), str(out), "--quiet"]) == 130
    assert len(calls) == 3
    assert_nothing_left(out)


def _orbax_writes(monkeypatch, wrap):
    """Routes every Orbax partial save through `wrap(response) -> response` (each write runs
    in Orbax's background threads once scheduled); returns the list of real responses."""
    from orbax.checkpoint import v1
    from orbax.checkpoint.experimental.v1._src.partial import saving

    real, responses = saving.save_async, []

    def save_async(*args, **kwargs):
        response = real(*args, **kwargs)
        responses.append(response)
        return wrap(response, len(responses))

    monkeypatch.setattr(saving, "save_async", save_async)
    monkeypatch.setattr(v1.partial, "save_async", save_async)
    return responses


class _InterruptedWait:
    """A response whose first result() raises KeyboardInterrupt, as a Ctrl-C while waiting
    for the write would (the write itself goes on in the background)."""

    def __init__(self, response):
        self.response, self.raised = response, False

    def result(self, timeout=None):
        if not self.raised:
            self.raised = True
            raise KeyboardInterrupt
        return self.response.result(timeout)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "raise"])
def test_interrupt_during_an_orbax_write_leaves_nothing(tiny_hf, tmp_path, monkeypatch, capsys, how):
    """A signal that lands while Orbax writes in the background is held until the write is
    done, then stops the conversion; an interrupt that does cut the wait short still waits for
    the write before the temporary folder goes. Either way: one line, exit 130, nothing left."""
    _, src = tiny_hf["untied"]

    def wrap(response, n):
        if n != 2:
            return response
        if how == "raise":
            return _InterruptedWait(response)
        os.kill(os.getpid(), getattr(signal, how))
        return response

    responses = _orbax_writes(monkeypatch, wrap)
    out = tmp_path / "out"
    assert convert_main([str(src), str(out), "--quiet"]) == 130
    assert capsys.readouterr().err == "qwen2vl-convert: interrupted; nothing was written\n"
    assert len(responses) == 2  # stopped before the next layer
    for response in responses:
        response.result(timeout=0)  # every write had finished (and succeeded) before the cleanup
    time.sleep(0.3)
    assert_nothing_left(out)


def test_interrupt_during_an_export_read_leaves_nothing(tiny_hf, tmp_path, monkeypatch, capsys):
    _, src = tiny_hf["untied"]
    jax_dir, back = tmp_path / "jax", tmp_path / "hf"
    convert_checkpoint(src, jax_dir, dtype="float32", progress=False)
    real, loaded = checkpoint.load_numpy, []

    def load_numpy(*args, **kwargs):
        if len(loaded) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        arrays = real(*args, **kwargs)
        loaded.append(sorted(arrays))  # only reached when the signal did not cut the read short
        return arrays

    monkeypatch.setattr(checkpoint, "load_numpy", load_numpy)
    assert export_main([str(jax_dir), str(back), "--quiet"]) == 130
    assert capsys.readouterr().err == "qwen2vl-export: interrupted; nothing was written\n"
    assert len(loaded) == 2
    assert_nothing_left(back)


def _int_weight(folder: Path) -> None:
    t = read_all(folder)
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].astype(np.int32)
    (folder / "model.safetensors").unlink()
    save_file(t, folder / "model.safetensors")


def _list_header(folder: Path) -> None:
    (folder / "extra.safetensors").write_bytes(struct.pack("<Q", 7) + b"[1,2,3]")


def _list_weight_map(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def _write(name: str, text: bytes):
    def apply(folder: Path) -> None:
        (folder / name).write_bytes(text)
    return apply


def _bad_json_header(folder: Path) -> None:
    header = b'{"a": {"dtype": "F32",}}'
    (folder / "extra.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)


def _config(edit):
    def apply(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return apply


def _set_hidden_size(cfg: dict) -> dict:
    cfg["text_config"]["hidden_size"] = "abc"
    return cfg


@pytest.mark.parametrize("damage,pattern", [
    (_config(lambda cfg: [1, 2]), r"config.json: (not a JSON object|expected a JSON object)"),
    (_config(_set_hidden_size), r"config.json: .*'abc'"),
    (_list_header, r"extra.safetensors: .*header is not a JSON object"),
    (_list_weight_map, r"model.safetensors.index.json: .*weight_map"),
    (_int_weight, r"model.layers.0.mlp.up_proj.weight: dtype I32 .*floating-point"),
    (_write("config.json", b'{"model_type": "qwen2_vl",'), r"config.json.* valid JSON"),
    (_write("model.safetensors.index.json", b'{"weight_map": {"a": "model.safetensors"'),
     r"model.safetensors.index.json: not valid JSON \(expecting .* at column \d+\)$"),
    (_write("model.safetensors.index.json", b'{"metadata": {}}'), r"model.safetensors.index.json: .*no weight_map"),
    (_bad_json_header, r"extra.safetensors: safetensors header: not valid JSON \(.*column \d+\)$"),
], ids=["config_list", "config_bad_value", "header_list", "weight_map_list", "int_dtype", "config_not_json",
        "index_not_json", "index_without_weight_map", "header_not_json"])
def test_malformed_input_is_one_line_exit_2(tiny_hf, tmp_path, capsys, damage, pattern):
    import re

    _, src = tiny_hf["untied"]
    bad = Path(shutil.copytree(src, tmp_path / "bad"))
    damage(bad)
    out = tmp_path / "out"
    assert convert_main([str(bad), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen2vl-convert: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err.strip()), err
    assert_nothing_left(out)


def test_out_dir_that_cannot_be_created_is_one_line(tiny_hf, tmp_path, capsys):
    _, src = tiny_hf["tied"]
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    assert convert_main([str(src), str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"qwen2vl-convert: error: cannot create {out}") and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def _state_files(params: Path, where: str) -> list[Path]:
    """The OCDBT files of params/state: 'index' (B-tree nodes, state/d/) or 'data' (the arrays,
    state/ocdbt.process_*/d/), largest first."""
    state = params / "state"
    files = (state / "d").glob("*") if where == "index" else state.glob("ocdbt.process_*/d/*")
    return sorted(files, key=lambda f: -f.stat().st_size)


def _cut(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


# damage to a converted folder's params/ -> what the one line says after "<folder>/params: "
PARAMS_DAMAGE = {
    "data file truncated": (lambda p: _cut(_state_files(p, "data")[0], 100),
                            r"damaged checkpoint: data file state/ocdbt\.process_\w+/d/\w+ is cut short "
                            r"\(100 bytes, the checkpoint needs [\d,]+: an interrupted copy\?\)"),
    "data file deleted": (lambda p: _state_files(p, "data")[0].unlink(),
                          r"damaged checkpoint: data file state/ocdbt\.process_\w+/d/\w+ is missing"),
    "index file deleted": (lambda p: _state_files(p, "index")[0].unlink(),
                           r"damaged checkpoint: index file state/d/\w+ is missing"),
    "manifest removed": (lambda p: (p / "state" / "manifest.ocdbt").unlink(),
                         r"damaged checkpoint: state/manifest\.ocdbt is missing"),
    "manifest truncated": (lambda p: _cut(p / "state" / "manifest.ocdbt", 50),
                           r"damaged checkpoint: state/manifest\.ocdbt cannot be decoded \(cut short or damaged\)"),
    "metadata truncated": (lambda p: _cut(p / "state" / "_METADATA", 500),
                           r"damaged checkpoint: state/_METADATA is not valid JSON \(cut short\?\)"),
    "checkpoint metadata deleted": (lambda p: (p / "_CHECKPOINT_METADATA").unlink(),
                                    r"damaged checkpoint: _CHECKPOINT_METADATA is missing"),
}


@pytest.mark.parametrize("damage", list(PARAMS_DAMAGE))
def test_damaged_params_are_one_clean_line(tmp_path, capsys, damage):
    """A converted folder whose params/ lost or cut short a file: loading it and exporting it
    are one line naming the folder and what is wrong (no TensorStore spec, no Orbax warning
    or traceback on stderr), and the export writes nothing."""
    import re

    from qwen2vl_jax.config import DEMO_DIR, Qwen2VLConfig

    folder = Path(shutil.copytree(DEMO_DIR, tmp_path / "model"))
    params = folder / checkpoint.PARAMS
    harm, pattern = PARAMS_DAMAGE[damage]
    harm(params)
    expected = re.escape(f"{params}: ") + pattern + "$"
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_params(folder, Qwen2VLConfig.from_hf(folder))
    assert re.match(expected, str(err.value)), str(err.value)
    back = tmp_path / "hf"
    assert export_main([str(folder), str(back), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match("qwen2vl-export: error: " + expected, err.strip()), err
    assert len(err) < 300 and not any(w in err for w in ("TensorStore", "tensorstore", "pybind", "Traceback"))
    assert_nothing_left(back)


def test_tensorstore_reports_are_put_in_words():
    """What TensorStore says about damage it meets while reading (data that no size check can
    see: corrupt bytes) becomes the parameter and a few words, without the spec it appends."""
    params = Path("/ckpt/model/params")
    wrapper = Exception("Encountered error while reading array index: (slice(0, 128, 1),). See full TensorStore "
                        "details: <bound method pybind11_detail_function_record_v1.spec of TensorStore({\n  'base': {")
    wrapper.__cause__ = ValueError(
        'FAILED_PRECONDITION: Error reading shard entry {0, 0}/{1, 1} in "model.layers_2.mlp.up_proj.kernel/c/0/0" '
        f'in OCDBT database at local file "{params}/state/": ZSTD_decompressStream() failed: Data corruption detected')
    assert checkpoint._reason(wrapper, params) == "parameter model/layers_2/mlp/up_proj/kernel: its data is corrupt"
    assert first_line(wrapper, 200) == "Encountered error while reading array index: (slice(0, 128, 1),)"
    cut = ValueError('OUT_OF_RANGE: Error reading shard entry {0, 0}/{1, 1} in "visual.merger.mlp_0.kernel/c/0/0" '
                     f'in OCDBT database at local file "{params}/state/": Requested byte range [0, 217245) is not '
                     "valid for value of size 100")
    assert checkpoint._reason(cut, params) == ("parameter visual/merger/mlp_0/kernel: its data file is cut short "
                                               "(100 bytes, it needs 217,245)")
    gone = ValueError('NOT_FOUND: Error opening "zarr3" driver: Error reading "model.norm.scale/zarr.json" in OCDBT '
                      f'database at local file "{params}/state/": Error reading Byte range [0, 22190) of local file '
                      f'"{params}/state/d/ab12" [tensorstore_spec=\'{{"driver": "zarr3"}}\']')
    assert checkpoint._reason(gone, params) == "state/d/ab12 is missing"
    other = ValueError(f'PERMISSION_DENIED: Error reading local file "{params}/state/d/ab12" '
                       "[tensorstore_spec='{\"driver\": \"zarr3\"}']")
    assert checkpoint._reason(other, params) == 'PERMISSION_DENIED: Error reading local file "state/d/ab12"'


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_main([str(tmp_path / "nowhere" / "x"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen2vl-convert: error: no such folder") and err.count("\n") == 1
    assert_nothing_left(out)
    assert export_main([str(tmp_path), str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not a converted folder" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        convert_main([str(tmp_path), str(out), "--dtype", "float16"])
    assert exit_.value.code == 2


def test_help_explains_every_flag(capsys):
    for main, flags in ((convert_main, ["--dtype", "--force", "--quiet", "HF_DIR", "OUT_DIR"]),
                        (export_main, ["--dtype", "--force", "--quiet", "--max-shard-size", "HF_DIR", "OUT_DIR"])):
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text


def test_hub_id_offline_fails_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from qwen2vl_jax.convert.cli import convert_main; "
                               "sys.exit(convert_main(sys.argv[1:]))", "Qwen/Qwen2-VL-2B-Instruct", str(out)],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qwen2vl-convert: error: Qwen/Qwen2-VL-2B-Instruct is not a local folder and could "
                               "not be fetched")
    assert_nothing_left(out)


def test_params_that_no_longer_match_config_are_refused(tiny_hf, tmp_path):
    from qwen2vl_jax.api import Qwen2VL

    _, src = tiny_hf["untied"]
    out = tmp_path / "jax"
    convert_checkpoint(src, out, dtype="float32", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"params do not match config.json: .*missing: model/layers_2/"):
        Qwen2VL.from_pretrained(out, dtype="float32")
    back = tmp_path / "hf"
    with pytest.raises(CheckpointError, match="params do not match config.json"):
        export_checkpoint(out, back, progress=False)
    assert_nothing_left(back)


def test_groups_stream_one_layer_at_a_time(tiny_hf):
    from qwen2vl_jax.config import Qwen2VLConfig

    _, src = tiny_hf["untied"]
    items = convert_lib.plan(src, Qwen2VLConfig.from_hf(src))
    keys = [convert_lib.group_of(g[0].path) for g in convert_lib.groups(items)]
    assert len(keys) == len(set(keys))
    assert {"model/layers_0", "model/layers_1", "visual/blocks_0", "model/embed_tokens", "lm_head/kernel"} <= set(keys)
    assert max(len(g) for g in convert_lib.groups(items)) == 12  # one vision block: the biggest group


def test_from_pretrained_on_a_mesh_restores_into_named_shardings(tiny_hf, tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding

    from qwen2vl_jax.api import Qwen2VL

    hf_model, src = tiny_hf["tied"]
    out = tmp_path / "jax"
    convert_checkpoint(src, out, dtype="float32", progress=False)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    model = Qwen2VL.from_pretrained(out, dtype="float32", mesh=mesh)
    leaves = flatten(model.params)
    assert all(isinstance(v.sharding, NamedSharding) and v.sharding.mesh == mesh for v in leaves.values())
    mine = model.logits(**CASE.inputs())
    hf_utils.assert_logits_close(mine, hf_logits(hf_model, "tied"), CASE.attention_mask)


def test_no_tokenizer_note_when_the_files_are_there(variants, tmp_path, capsys):
    _, src = variants["tied-tf5-flat-single"]
    folder = tmp_path / "hf"
    shutil.copytree(src, folder)
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("")
    assert convert_main([str(folder), str(tmp_path / "jax"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- the shared command-line shell
def _train_main(argv):
    from qwen2vl_jax.train.cli import main

    return main(argv)


# tool -> (prog, main, arguments given the test's tmp_path, what the line says after "error: ")
BAD_INPUT = {
    "convert": ("qwen2vl-convert", convert_main, lambda t: [str(t / "nowhere" / "x"), str(t / "out")],
                "no such folder"),
    "export": ("qwen2vl-export", export_main, lambda t: [str(t), str(t / "out")], "is not a converted folder"),
    "export-size": ("qwen2vl-export", export_main, lambda t: [str(t), str(t / "out"), "--max-shard-size", "5XB"],
                    "--max-shard-size '5XB' is not a size (use e.g. 5GB, 500MB, 2GiB)"),
    "train": ("qwen2vl-train", _train_main,
              lambda t: ["--model", str(t / "nowhere"), "--data", "d.jsonl", "--stage", "3", "--steps", "1",
                         "--out", str(t / "out"), "--no-progress"], "--model "),
    "train-flag": ("qwen2vl-train", _train_main,
                   lambda t: ["--model", str(t), "--data", "d.jsonl", "--stage", "3", "--steps", "1",
                              "--out", str(t / "out"), "--lr", "-1", "--no-progress"], "--lr must be positive"),
}


@pytest.mark.parametrize("tool", list(BAD_INPUT))
def test_every_cli_reports_bad_input_in_one_format(tmp_path, capsys, tool):
    """convert, export and train say what was wrong in one line, `PROG: error: ...` like
    argparse's own errors, and exit with status 2, leaving nothing behind."""
    prog, main, args, says = BAD_INPUT[tool]
    assert main(args(tmp_path)) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith(f"{prog}: error: ") and says in err[0], err
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["convert", "export", "train"])
def test_argparse_errors_share_the_format(tmp_path, capsys, tool):
    prog, main, args, _ = BAD_INPUT[tool]
    with pytest.raises(SystemExit) as exit_:
        main([*args(tmp_path), "--no-such-flag"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"{prog}: error: unrecognized arguments")


def _raises(e: BaseException):
    def main():
        raise e
    return main


@pytest.mark.parametrize("error,status,line", [
    (InputError("the first line\nand more"), 2, "tool: error: the first line"),
    (CheckpointError(""), 2, "tool: error: CheckpointError"),
    (OSError(28, "No space left on device", "/runs/out/params"), 1, "tool: error: No space left on device: /runs/out/params"),
    (OSError(18, "Invalid cross-device link", "/a", None, "/b"), 1, "tool: error: Invalid cross-device link: /a -> /b"),
    (OSError(13, "Permission denied"), 1, "tool: error: Permission denied"),
    (PermissionError("cannot write\n  here"), 1, "tool: error: cannot write"),
    (KeyboardInterrupt(), 130, "tool: interrupted"),
])
def test_shell_maps_each_failure_to_one_line_and_a_status(capsys, error, status, line):
    from qwen2vl_jax import shell

    assert shell.run("tool", _raises(error)) == status
    assert capsys.readouterr().err == line + "\n"


def test_shell_statuses_and_interrupt_messages(capsys):
    import signal

    from qwen2vl_jax import interrupts, shell

    assert shell.run("tool", lambda: None) == 0
    assert shell.run("tool", lambda: 3) == 3
    assert capsys.readouterr().err == ""
    said = []

    def interrupted(e):
        said.append(e)
        return "stopped after step 3"

    assert shell.run("tool", _raises(KeyboardInterrupt()), interrupted=interrupted) == 130
    assert capsys.readouterr().err == "tool: stopped after step 3\n" and isinstance(said[0], KeyboardInterrupt)
    assert shell.run("tool", _raises(KeyboardInterrupt()), interrupted=lambda e: "") == 130
    assert capsys.readouterr().err == "tool: interrupted\n"
    # SIGTERM unwinds like Ctrl-C, and the handlers are put back afterwards.
    before = signal.getsignal(signal.SIGTERM)
    assert shell.run("tool", lambda: signal.raise_signal(signal.SIGTERM)) == 130
    assert capsys.readouterr().err == "tool: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is before

    def cut_short():  # a Ctrl-C noted while held, then the error it caused inside a library
        with interrupts.held():
            signal.raise_signal(signal.SIGINT)
            raise RuntimeError("the write was cut short")

    assert shell.run("tool", cut_short) == 130
    assert capsys.readouterr().err == "tool: interrupted\n"
    with pytest.raises(ValueError, match="a bug"):  # anything else is a bug: a traceback
        shell.run("tool", _raises(ValueError("a bug")))


def test_shell_stops_quietly_when_the_reader_goes():
    code = ("import sys; from qwen2vl_jax import shell\n"
            "def main():\n"
            "    for _ in range(10000):\n"
            "        print('x' * 1000)\n"
            "sys.exit(shell.run('tool', main))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == b""
