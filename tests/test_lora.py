"""LoRA: adapters against peft (both directions, in HF's model), merged against unmerged, the
merged export, and training: LoRA on a float base (scanned, accumulated, dropout,
resumed exactly) and QLoRA on int8 and int4 folders.

Parity is in fp32 on a tiny random model, at the model parity tests' tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import hf_utils
from qwen2vl_jax import checkpoint as ck
from qwen2vl_jax.errors import CheckpointError, InputError
from qwen2vl_jax.lora.peft_format import CONFIG, WEIGHTS, save_adapter
from qwen2vl_jax.lora.tree import LoraSpec, init_adapter
from qwen2vl_jax.modules.qwen2vl import init_shapes
from qwen2vl_jax.params import flatten

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

SPEC = hf_utils.SPECS["untied"]
CASE = hf_utils.standard_cases()[4]  # an image and a video, so the vision tower's adapters count
# peft's own adapter: decoder, a vision block's qkv and the merger, B random (not zero)
PEFT_TARGETS = r".*(self_attn\.[qv]_proj|mlp\.down_proj|blocks\.0\.attn\.qkv|merger\.mlp\.0)$"
# ours: every attention projection, one layer's MLP, the vision MLP's fc2, the merger's out, lm_head
OUR_TARGETS = r"self_attn/|layers_1/mlp/up_proj|mlp/fc2|merger/mlp_2|lm_head"


def relative_error(mine, ref) -> float:
    real = CASE.attention_mask.astype(bool)
    return float(np.abs(mine[real] - ref[real]).max() / np.abs(ref[real]).max())


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(**CASE.torch_inputs()).logits.numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(HF folder of the tiny model, its converted folder, the float shapes)."""
    from qwen2vl_jax.convert.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("lora_base")
    hf_utils.save_hf_model(hf_utils.build_hf_model(SPEC), root / "hf")
    convert_checkpoint(root / "hf", root / "converted", dtype="float32", progress=False)
    return root / "hf", root / "converted", init_shapes(hf_utils.spec_config(SPEC))


@pytest.fixture(scope="module")
def our_adapter(base, tmp_path_factory):
    """An adapter written by us, with random B (a fresh one would be zero)."""
    _, _, shapes = base
    adapter = init_adapter(shapes, LoraSpec(rank=3, alpha=5.0, targets=OUR_TARGETS), seed=1)
    rng = np.random.default_rng(0)
    for path in adapter:
        if path.endswith("lora_b"):
            adapter[path] = rng.normal(0, 0.3, adapter[path].shape).astype(np.float32)
    return save_adapter(tmp_path_factory.mktemp("ours") / "adapter", adapter, shapes)


def test_peft_adapter_in_our_model(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from qwen2vl_jax import Qwen2VL

    hf_dir, _, _ = base
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=7, target_modules=PEFT_TARGETS, init_lora_weights=False,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"merger.mlp.0": 3})
    model = get_peft_model(hf_utils.build_hf_model(SPEC), config).eval()
    model.save_pretrained(tmp_path / "peft")
    ref = hf_logits(model)
    ours = Qwen2VL.from_pretrained(hf_dir, dtype="float32", adapter=tmp_path / "peft")
    assert relative_error(ours.logits(**CASE.inputs()), ref) <= hf_utils.LOGITS_RTOL
    assert relative_error(hf_logits(hf_utils.build_hf_model(SPEC)), ref) > 0.05  # the adapter matters


def test_our_adapter_in_peft(base, our_adapter, tmp_path):
    """peft loads what we write, to the same logits, and writes back exactly our names and shapes."""
    from peft import PeftModel
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.safetensors_io import read_header

    hf_dir, converted, _ = base
    model = PeftModel.from_pretrained(hf_utils.build_hf_model(SPEC), our_adapter).eval()
    ref = hf_logits(model)
    for folder in (hf_dir, converted):
        ours = Qwen2VL.from_pretrained(folder, dtype="float32", adapter=our_adapter)
        assert relative_error(ours.logits(**CASE.inputs()), ref) <= hf_utils.LOGITS_RTOL
    model.save_pretrained(tmp_path / "again")
    shapes = lambda f: {k: v["shape"] for k, v in read_header(f / WEIGHTS)[0].items()  # noqa: E731
                        if "base_layer" not in k}  # peft adds lm_head's own weight when it is adapted
    assert shapes(tmp_path / "again") == shapes(our_adapter)
    Qwen2VL.from_pretrained(hf_dir, adapter=tmp_path / "again")  # which we read back
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in shapes(our_adapter)
    assert "base_model.model.model.visual.merger.mlp.2.lora_B.weight" in shapes(our_adapter)
    config = json.loads((our_adapter / CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (3, 5, "LORA")


def test_merged_equals_unmerged_and_the_merged_export(base, our_adapter, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.convert.cli import export_main

    hf_dir, converted, _ = base
    unmerged = Qwen2VL.from_pretrained(converted, dtype="float32", adapter=our_adapter).logits(**CASE.inputs())
    merged = Qwen2VL.from_pretrained(converted, dtype="float32", adapter=our_adapter, merge_adapter=True)
    assert relative_error(merged.logits(**CASE.inputs()), unmerged) <= hf_utils.LOGITS_RTOL
    assert export_main([str(converted), str(tmp_path / "merged"), "--adapter", str(our_adapter), "--quiet"]) == 0
    exported = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    peft_model = PeftModel.from_pretrained(hf_utils.build_hf_model(SPEC), our_adapter).eval()
    assert relative_error(hf_logits(exported), hf_logits(peft_model)) <= hf_utils.LOGITS_RTOL


def test_bad_adapters_are_one_line(base, our_adapter, tmp_path):
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.lora.peft_format import load_adapter

    hf_dir, _, shapes = base
    config = json.loads((our_adapter / CONFIG).read_text())
    for change, match in (({"use_dora": True}, "use_dora=True"), ({"peft_type": "IA3"}, "only LORA")):
        bad = tmp_path / next(iter(change))
        bad.mkdir()
        (bad / CONFIG).write_text(json.dumps({**config, **change}))
        (bad / WEIGHTS).write_bytes((our_adapter / WEIGHTS).read_bytes())
        with pytest.raises(CheckpointError, match=match):
            load_adapter(bad, shapes)
    other = init_shapes(hf_utils.spec_config(hf_utils.SPECS["seed2"]))  # other widths
    with pytest.raises(CheckpointError, match=r"does not fit the model: .*shape mismatch"):
        load_adapter(our_adapter, other)
    with pytest.raises(InputError, match="does not exist"):
        Qwen2VL.from_pretrained(hf_dir, adapter=tmp_path / "none")
    with pytest.raises(InputError, match="fuse_projections"):
        Qwen2VL.from_pretrained(hf_dir, adapter=our_adapter, fuse_projections=True)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    """The tiny training folder of test_train, int8 and int4 copies of it, and one JSONL whose
    records are alike (one image, one answer), so a run compiles one step."""
    from test_train import make_tiny_folder, qa, write_jsonl
    from qwen2vl_jax.convert.convert import convert_checkpoint
    from qwen2vl_jax.convert.export import export_checkpoint

    root = tmp_path_factory.mktemp("lora_train")
    make_tiny_folder(root, images=1)
    data = write_jsonl(root / "qa.jsonl", [qa("img/0.png", "What shape is this?", "a red circle")] * 4)
    export_checkpoint(root / "model", root / "hf", progress=False)
    for method in ("int8", "int4"):
        convert_checkpoint(root / "hf", root / method, quantize=method, progress=False)
    return root, data


def lora_options(root: Path, data: Path, model: str, out: str, **extra):
    from qwen2vl_jax.train.run import TrainOptions

    options = dict(model=root / model, data=data, stage=3, steps=4, out=root / out, batch_size=2,
                   learning_rate=2e-2, warmup_steps=0, seed=1, log_every=1, progress=False, lora_rank=4)
    return TrainOptions(**{**options, **extra})


def final_state(opts):
    """The state of a run's last checkpoint (params with the decoder as the run held it)."""
    from qwen2vl_jax.train import loop, run

    config = ck.read_config(opts.model)
    trainer = loop.Trainer(config, opts.stage_spec(), opts.steps, scan_layers=opts.scan_layers)
    abstract = trainer.abstract_state(run.state_params(opts, run.base_shapes(Path(opts.model), config), config))
    checkpoints = loop.Checkpoints(Path(opts.out) / "train_state")
    try:
        return checkpoints.restore(abstract)[0]
    finally:
        checkpoints.close()


def losses(out: Path) -> list[float]:
    return [float(line.split(",")[1]) for line in (out / "losses.csv").read_text().splitlines()[1:]]


def test_lora_training_resumes_exactly_and_loads_back(train_folder, monkeypatch):
    """Scanned decoder, 2 micro-batches and dropout; 4 steps straight (through the CLI)
    equal 2, stop, resume, 2 more. Only adapter leaves change; the written adapter gives the
    logits of the trained params."""
    from qwen2vl_jax import Qwen2VL
    from qwen2vl_jax.params import unstack_layers
    from qwen2vl_jax.train.cli import main
    from qwen2vl_jax.train.run import fit

    root, data = train_folder
    monkeypatch.chdir(root)
    targets = r"_proj/kernel$|merger/mlp_0"
    assert main(["--model", "model", "--data", "qa.jsonl", "--stage", "3", "--steps", "4", "--out", "straight",
                 "--batch-size", "1", "--accum", "2", "--lr", "2e-2", "--warmup", "0", "--seed", "1",
                 "--log-every", "1", "--no-progress", "--scan-layers", "--lora-rank", "4",
                 "--lora-dropout", "0.1", "--lora-targets", targets]) == 0
    common = dict(scan_layers=True, accum=2, batch_size=1, lora_dropout=0.1, lora_targets=targets)
    fit(lora_options(root, data, "model", "split", stop_at=2, **common), log=lambda s: None)
    with pytest.raises(InputError, match=r"--lora-rank/--lora-alpha/--lora-dropout/--lora-targets \(was"):
        fit(lora_options(root, data, "model", "split", resume=True, **{**common, "lora_dropout": 0.2}))
    fit(lora_options(root, data, "model", "split", resume=True, **common), log=lambda s: None)

    opts = lora_options(root, data, "model", "straight", **common)
    straight, split = final_state(opts), final_state(lora_options(root, data, "model", "split", **common))
    a, b = flatten(jax.device_get(straight.params)), flatten(jax.device_get(split.params))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    base = flatten(ck.load_params(root / "model", ck.read_config(root / "model")))
    trained = flatten(unstack_layers(jax.device_get(straight.params)))
    assert {k for k in trained if "lora_" not in k} == set(base)
    assert all(np.array_equal(np.asarray(base[k], np.float32), trained[k]) for k in base)
    assert any(k.startswith("visual/merger/mlp_0/lora_") for k in trained)
    assert not np.array_equal(trained["model/layers_0/self_attn/q_proj/lora_b"], 0)
    assert losses(root / "straight")[-1] < losses(root / "straight")[0]

    ids = np.array([[5, 6, 7, 8, 9]])
    config = ck.read_config(root / "model")
    in_memory = Qwen2VL(config, unstack_layers(straight.params), dtype="float32")  # dropout leaves: idle here
    loaded = Qwen2VL.from_pretrained(root / "model", dtype="float32", adapter=root / "straight" / "adapter")
    np.testing.assert_allclose(loaded.logits(input_ids=ids), in_memory.logits(input_ids=ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_qlora_keeps_the_packed_base(train_folder, method):
    """Adapters over an int8 / int4 folder: the loss falls, the packed leaves come out of the run
    bit-identical, and the written adapter over the packed folder gives the trained logits."""
    from qwen2vl_jax.train.run import fit

    root, data = train_folder
    opts = lora_options(root, data, method, f"q_{method}")
    fit(opts, log=lambda s: None)
    assert losses(root / f"q_{method}")[-1] < losses(root / f"q_{method}")[0]
    stored = flatten(ck.load_params(root / method, ck.read_config(root / method)))
    state = flatten(jax.device_get(final_state(opts).params))
    packed = [k for k in stored if k.endswith("/qweight")]
    assert packed and all(state[k].dtype == stored[k].dtype for k in packed)
    assert all(np.array_equal(state[k], np.asarray(stored[k], state[k].dtype)) for k in stored)
    from qwen2vl_jax import Qwen2VL

    ids = np.array([[5, 6, 7, 8, 9]])
    config = ck.read_config(root / method)
    loaded = Qwen2VL.from_pretrained(root / method, dtype="float32", adapter=root / f"q_{method}" / "adapter")
    in_memory = Qwen2VL(config, jax.device_get(final_state(opts).params), dtype="float32")
    np.testing.assert_allclose(loaded.logits(input_ids=ids), in_memory.logits(input_ids=ids), rtol=0, atol=1e-5)
