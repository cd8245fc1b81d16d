"""The Colab notebooks run top to bottom on CPU: the demo model, a few steps, no network.

Each notebook is executed with nbclient in a fresh python3 kernel, with its `parameters` cell
followed by an injected cell that overrides the values (papermill's convention); a cell that
raises fails the test. The kernel sees two simulated CPU devices, so the mesh code paths
(tensor-parallel inference and conversion, FSDP training) run as they would on a TPU.
"""

from __future__ import annotations

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


def execute(name: str, params: dict, cwd: Path, checks: str | None = None):
    """Runs the notebook with `params` injected after its parameters cell and `checks` as a
    last cell; returns the executed notebook. Raises CellExecutionError on a failing cell."""
    nb = read(name)
    i = parameters_index(nb)
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(i + 1, injected)
    if checks:
        nb.cells.append(nbformat.v4.new_code_cell(checks))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


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


@pytest.fixture
def kernel_env(monkeypatch):
    """What the notebook kernels inherit: CPU, two devices, no hub access."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


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


def test_inference_notebook(demo, kernel_env, tmp_path):
    nb = execute("inference", dict(MODEL=demo, MESH="tensor=2", DTYPE="float32", MAX_NEW_TOKENS=8,
                                   WORK_DIR=str(tmp_path / "work")), tmp_path, INFERENCE_CHECKS)
    text = outputs_text(nb)
    assert text.count("tokens/s") >= 4  # image, again compiled, images, video
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 2}" in text
    assert "answers checked" in text
    # the grounding cell's box, read and drawn: the demo model's own, over the circle (its boxes are coarse)
    iou = re.search(r"IoU with the drawn circle: ([0-9.]+)", text)
    assert iou and float(iou.group(1)) > 0, text
    assert "hand-written" not in text


def test_finetune_notebook(demo, kernel_env, tmp_path):
    """The default path: a packed LoRA run, its adapter, generation with it, the merged export."""
    work = tmp_path / "work"
    execute("finetune", dict(MODEL=demo, DATA=None, SYNTHETIC=dict(images=12, videos=2, eval_per_task=2),
                             LORA_STEPS=2, BATCH_SIZE=2, MESH="auto", COMPUTE_DTYPE="float32",
                             MAX_NEW_TOKENS=4, WORK_DIR=str(work)), tmp_path)
    rows = [json.loads(x) for x in (work / "lora" / "train_log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    assert (work / "lora" / "loss.png").is_file()
    assert {p.name for p in (work / "lora" / "adapter").iterdir()} >= {"adapter_config.json",
                                                                       "adapter_model.safetensors"}
    assert (work / "finetuned-hf" / "model.safetensors").is_file()


def test_convert_notebook(demo, kernel_env, tmp_path):
    """A small HF checkpoint (the demo model exported) converted, compared and exported back."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qwen2vl_jax.convert.convert import model_folder
    from qwen2vl_jax.convert.export import export_checkpoint

    hf = export_checkpoint(model_folder(demo), tmp_path / "hf", dtype="float32", progress=False)
    work = tmp_path / "work"
    checks = "assert max_abs_diff <= 5e-6 * np.abs(ref).max(), (max_abs_diff, np.abs(ref).max())"
    nb = execute("convert", dict(MODEL=str(hf), DTYPE="float32", MESH="tensor=2", COMPARE=True,
                                 WORK_DIR=str(work)), tmp_path, checks)
    assert "max |ours - transformers|" in outputs_text(nb)
    assert (work / "hf-export" / "model.safetensors").is_file()
