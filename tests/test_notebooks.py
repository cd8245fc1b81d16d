"""The Colab notebooks run top to bottom on CPU: the demo model, a few steps, no network.

Each notebook is executed with nbclient in a fresh python3 kernel, with its `parameters` cell
followed by an injected cell that overrides the values (papermill's convention); a cell that
raises fails the test. The kernel sees two simulated CPU devices, so the mesh code paths
(tensor-parallel inference and conversion, FSDP training) run as they would on a TPU. The
notebooks whose tests are selected run at once, each in its own kernel (`executed`), and each
test checks its own notebook's run.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("inference", "finetune", "convert")
COLAB = "https://colab.research.google.com/github/qwen2vl-jax/qwen2vl-jax/blob/main/notebooks/{}.ipynb"


def read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def parameters_index(nb) -> int:
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(found) == 1, f"want exactly one cell tagged 'parameters', found {len(found)}"
    return found[0]


def client_for(name: str, params: dict, cwd: Path, checks: str | None = None):
    """A client that runs the notebook with `params` injected after its parameters cell and
    `checks` as a last cell (`await client.async_execute()` -> the executed notebook; it raises
    CellExecutionError on a failing cell)."""
    nb = read(name)
    i = parameters_index(nb)
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(i + 1, injected)
    if checks:
        nb.cells.append(nbformat.v4.new_code_cell(checks))
    return nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    """The MODEL value for the demo model: "demo" when the package ships it; otherwise (a
    checkout before the demo model was trained) a random-init folder of the same layout."""
    from qwen2vl_jax.train.demo import DEMO_DIR

    if (DEMO_DIR / "config.json").is_file():
        return "demo"
    from qwen2vl_jax.train import demo, synthetic

    folder = tmp_path_factory.mktemp("demo")
    demo.init_folder(folder)
    synthetic.make_example_image(folder / "example.png")
    return str(folder)


# What the notebook kernels inherit: CPU, two devices, no hub access.
KERNEL_ENV = {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2", "HF_HUB_OFFLINE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


# ---------------------------------------------------------------- the committed files
@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean(name):
    """Outputs stripped, one parameters cell near the top, an Open in Colab link."""
    nb = read(name)
    nbformat.validate(nb)
    assert parameters_index(nb) <= 2
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks with outputs stripped"
    assert COLAB.format(name) in nb.cells[0].source
    assert COLAB.format(name) in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- executed on CPU
CONVERT_CHECKS = "assert max_abs_diff <= 5e-6 * np.abs(ref).max(), (max_abs_diff, np.abs(ref).max())"


def clients(name: str, demo: str, tmp: Path):
    """(the client that runs notebook `name` in folder `tmp`, its WORK_DIR)."""
    work = tmp / "work"
    if name == "inference":
        params = dict(MODEL=demo, MESH="tensor=2", DTYPE="float32", MAX_NEW_TOKENS=8, WORK_DIR=str(work))
        return client_for("inference", params, tmp, INFERENCE_CHECKS), work
    if name == "finetune":
        params = dict(MODEL=demo, DATA=None, SYNTHETIC=dict(images=12, videos=2, eval_per_task=2), LORA_STEPS=2,
                      BATCH_SIZE=2, MESH="auto", COMPUTE_DTYPE="float32", MAX_NEW_TOKENS=4, WORK_DIR=str(work))
        return client_for("finetune", params, tmp), work
    # convert: a small HF checkpoint (the demo model exported), converted, compared, exported back
    from qwen2vl_jax.convert.convert import model_folder
    from qwen2vl_jax.convert.export import export_checkpoint

    hf = export_checkpoint(model_folder(demo), tmp / "hf", dtype="float32", progress=False)
    params = dict(MODEL=str(hf), DTYPE="float32", MESH="tensor=2", COMPARE=True, WORK_DIR=str(work))
    return client_for("convert", params, tmp, CONVERT_CHECKS), work


@pytest.fixture(scope="module")
def executed(request, demo, tmp_path_factory) -> dict:
    """name -> (the executed notebook, or the exception its run raised; its WORK_DIR) for each
    notebook whose test is selected, the kernels running at once (the slowest sets the time)."""
    import importlib.util

    selected = {item.originalname for item in request.session.items
                if getattr(item, "module", None) is request.module}
    names = [n for n in NAMES if f"test_{n}_notebook" in selected
             and (n != "convert" or all(importlib.util.find_spec(m) for m in ("torch", "transformers")))]
    runs = {}
    for name in names:
        tmp = tmp_path_factory.mktemp(name)
        try:
            runs[name] = clients(name, demo, tmp)
        except Exception as e:  # noqa: BLE001 - raised in its own test
            runs[name] = e, tmp / "work"

    async def run(client):
        return client if isinstance(client, BaseException) else await client.async_execute()

    async def run_all():
        return await asyncio.gather(*(run(client) for client, _ in runs.values()), return_exceptions=True)

    with pytest.MonkeyPatch.context() as mp:
        for key, value in KERNEL_ENV.items():
            mp.setenv(key, value)
        done = asyncio.run(run_all()) if runs else []
    return {name: (out, work) for (name, (_, work)), out in zip(runs.items(), done)}


def run_of(executed: dict, name: str):
    """(the executed notebook, its WORK_DIR); a failing cell's error raised here, in its test."""
    out, work = executed[name]
    if isinstance(out, BaseException):
        raise out
    return out, work


# Run after the notebook, in its kernel: the demo model, loaded and sharded by the notebook,
# names the shape of its first image and the way its video's shape moves.
INFERENCE_CHECKS = """
import random as _random
from qwen2vl_jax.train import synthetic as _synthetic

_image, _truth = _synthetic.single_shape(_random.Random(3))
_ask = lambda part, q: chat(model, processor, [{"role": "user", "content": [part, {"type": "text", "text": q}]}],
                            max_new_tokens=MAX_NEW_TOKENS, out=None).text.lower()
_answer = _ask({"type": "image", "image": _image}, "What shape is this?")
assert _truth["shape"] in _answer, (_answer, _truth)
_frames, _truth = _synthetic.moving_shape(_random.Random(7))
_answer = _ask({"type": "video", "video": _frames, **_synthetic.VIDEO_PIXELS}, "Which way is the shape moving?")
assert _truth["direction"] in _answer, (_answer, _truth)
print("answers checked")
"""


def test_inference_notebook(executed):
    nb, _ = run_of(executed, "inference")
    text = outputs_text(nb)
    assert text.count("tokens/s") >= 4  # image, again compiled, images, video
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 2}" in text
    assert "answers checked" in text
    # the grounding cell's box, read and drawn: the demo model's own, over the circle (its boxes are coarse)
    iou = re.search(r"IoU with the drawn circle: ([0-9.]+)", text)
    assert iou and float(iou.group(1)) > 0, text
    assert "hand-written" not in text


def test_finetune_notebook(executed):
    """The default path: a packed LoRA run, its adapter, generation with it, the merged export."""
    _, work = run_of(executed, "finetune")
    rows = [json.loads(x) for x in (work / "lora" / "train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    assert (work / "lora" / "loss.png").is_file()
    assert {p.name for p in (work / "lora" / "adapter").iterdir()} >= {"adapter_config.json",
                                                                       "adapter_model.safetensors"}
    assert (work / "finetuned-hf" / "model.safetensors").is_file()


def test_convert_notebook(executed):
    """A small HF checkpoint (the demo model exported) converted, compared and exported back."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    nb, work = run_of(executed, "convert")
    assert "max |ours - transformers|" in outputs_text(nb)
    assert (work / "hf-export" / "model.safetensors").is_file()
