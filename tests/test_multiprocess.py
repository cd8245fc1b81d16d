"""Two processes on localhost, two CPU devices each, run as one 4-device mesh and give what one
process with four devices gives.

The check runs this file as a script (in the background from the start of the session, see
tests/children.py): once to write the model and data, then twice at once, as processes 0 and 1 of a
multi-process run (a local coordinator on a free port, Gloo collectives; JAX_PLATFORMS=cpu
JAX_NUM_CPU_DEVICES=2), then once alone with four devices. Each run
  1. calls `qwen2vl-generate` (its main function, with --coordinator, --num-processes and
     --process-id) on the shipped demo model, greedy, --json, over the mesh fsdp=2,tensor=2;
  2. runs the sharded forward pass and greedy generation of a batch of four rows (two with an
     image) over data=2,tensor=2, the rows split across the processes;
  3. trains two steps of stage 2 with `qwen2vl-train` (its main function, the same flags) over
     fsdp=2,tensor=2, each process reading its share of every batch.
The single run then restores the 2-process run's Orbax checkpoint and exported params in one
process. Every process writes its findings to a JSON file; the tests read them.

The flag checks at the end run in this process (no devices involved).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import children
from children import Children, Job

REPO = Path(__file__).resolve().parents[1]
GENERATE_MESH = "fsdp=2,tensor=2"
FORWARD_MESH = "data=2,tensor=2"
TRAIN_MESH = "fsdp=2,tensor=2"
NEW_TOKENS = 6
TIMEOUT_S = 600  # a hang guard: the runs take 110-125 s alone, more beside the rest of the suite


# ---------------------------------------------------------------- the worker
# The shipped demo model's tokenizer with a smaller network (one vision block, one decoder
# layer; heads and widths that tensor=2 divides), random weights: quick to compile.
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
TINY_VISION = {"depth": 1, "embed_dim": 48, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 64}


def _write_model(folder: Path) -> Path:
    import jax

    from qwen2vl_jax import checkpoint as ck
    from qwen2vl_jax.config import DEMO_DIR, Qwen2VLConfig
    from qwen2vl_jax.modules.qwen2vl import init_params

    hf = json.loads((DEMO_DIR / "config.json").read_text())
    hf.update(TINY)
    hf["vision_config"].update(TINY_VISION)
    folder.mkdir(parents=True)
    ck.copy_side_files(DEMO_DIR, folder, skip=("config.json",))
    (folder / "config.json").write_text(json.dumps(hf))
    params = init_params(Qwen2VLConfig.from_hf(hf), jax.random.PRNGKey(0))
    ck.save_params(jax.device_get(params), folder)
    return folder


def _write_data(folder: Path) -> Path:
    """Eight question/answer records on small drawn images (8 records = 2 steps of 4)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
    rows = []
    for i in range(8):
        name, rgb = list(colours.items())[i % 4]
        img = Image.new("RGB", (56, 56), "white")
        ImageDraw.Draw(img).rectangle([8, 8, 40, 40], fill=rgb)
        img.save(folder / f"{i}.png")
        question = "What colour is the shape?" if i % 3 else "Which colour do you see here?"
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"{i}.png"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": name}]}]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _worker(role: str, out: Path, coordinator: str | None, process_id: int) -> None:
    import jax

    multi = role == "multi"  # JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES come from _start

    from qwen2vl_jax.cli import generate_main
    from qwen2vl_jax.config import DEMO_DIR

    model_dir = out / "model"

    flags = ["--coordinator", coordinator, "--num-processes", "2", "--process-id", str(process_id)] if multi else []
    report: dict = {"seconds": {}}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        report["seconds"][name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    # 1. the CLI, which also joins the run (distributed.initialize) for what follows
    code = generate_main(["--model", str(model_dir), "--image", str(DEMO_DIR / "example.png"), "--prompt", "What shape is this?",
                          "--mesh", GENERATE_MESH, "--max-new-tokens", str(NEW_TOKENS), "--json", *flags])
    sys.stdout.flush()
    report["cli_exit"] = code
    lap("cli")
    report["devices"] = [jax.device_count(), jax.local_device_count(), jax.process_count(), jax.process_index()]

    # 2. forward and greedy generation of a batch of four, rows sharded over processes
    import numpy as np
    from jax.experimental import multihost_utils

    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.sharding import make_mesh

    processor = Processor.from_pretrained(model_dir)
    model = Qwen2VL.from_pretrained(model_dir, dtype="float32", mesh=make_mesh(FORWARD_MESH))
    image = str(DEMO_DIR / "example.png")
    prompts = [("What shape is this?", True), ("How many shapes are there?", False),
               ("What colour is the shape?", True), ("What word is written?", False)]
    texts = [processor.apply_chat_template([{"role": "user", "content": (
        [{"type": "image", "image": image}] if with_image else []) + [{"type": "text", "text": q}]}],
        add_generation_prompt=True) for q, with_image in prompts]
    inputs = processor(text=texts, images=[image, image], padding=True)
    packed = model.inputs(**inputs)
    logits = model.engine.forward(model.params, packed)  # [B, Lb, V], over both processes
    report["logits_sharding"] = [str(logits.sharding.spec), logits.is_fully_addressable]
    full = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
    report["logits"] = packed.unpack(full)[np.asarray(inputs["attention_mask"], bool)].tolist()
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    report["tokens"] = np.asarray(tokens).tolist()
    lap("forward_generate")

    # 3. two training steps through fit; record which records this process read
    from qwen2vl_jax.train import loader as train_loader, run

    read: list[int] = []
    original = train_loader.Loader._example

    def counting(self, i):
        read.append(int(i))
        return original(self, i)

    train_loader.Loader._example = counting
    writes = {"losses": 0, "plot": 0}
    append, plot = run._append_losses, run.plot_losses

    def counted(name, fn):
        def wrapper(*a, **k):
            writes[name] += 1
            return fn(*a, **k)
        return wrapper

    run._append_losses, run.plot_losses = counted("losses", append), counted("plot", plot)
    from qwen2vl_jax.train.cli import main as train_main

    code = train_main(["--model", str(model_dir), "--data", str(out / "data" / "data.jsonl"), "--stage", "2",
                       "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--mesh", TRAIN_MESH, "--log-every", "1",
                       "--no-progress", "--out", str(out / f"run-{role}"), *flags])
    lap("train")
    # in the order read (the reading thread may go on past the last step: later reads are ignored)
    report["train"] = {"exit": code, "read": list(read), "writes": writes}

    if not multi:  # 4. the 2-process run's checkpoint, restored in this one process
        from qwen2vl_jax import checkpoint as ck
        from qwen2vl_jax.modules.qwen2vl import init_shapes
        from qwen2vl_jax.train import loop, stages

        config = ck.read_config(model_dir)
        trainer = loop.Trainer(config, stages.get_stage(2, learning_rate=1e-3), 2)

        def restored(folder):
            ckpts = loop.Checkpoints(folder / "train_state")
            try:
                state, meta = ckpts.restore(trainer.abstract_state(init_shapes(config)))
            finally:
                ckpts.close()
            return jax.device_get(state.as_dict()), meta

        theirs, their_meta = restored(out / "run-multi")
        ours, _ = restored(out / "run-single")
        leaves = lambda tree: jax.tree_util.tree_leaves_with_path(tree)  # noqa: E731
        err = {}
        for (path, a), (_, b) in zip(leaves(ours["params"]), leaves(theirs["params"])):
            scale = max(float(np.abs(a).max()), 1e-6)
            err[jax.tree_util.keystr(path)] = float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale
        opt = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree_util.tree_leaves(ours["opt_state"]), jax.tree_util.tree_leaves(theirs["opt_state"]))]
        exported = ck.load_params(out / "run-multi", config, dtype="float32")
        export_err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
            jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(theirs["params"])))
        start = ck.load_params(model_dir, config, dtype="float32")
        moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
            jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(ours["params"])))
        report["restored"] = {"step": int(theirs["step"]), "position": their_meta["position"],
                              "param_err": err, "opt_err": max(opt), "export_err": export_err, "moved": moved}
    lap("restore")

    if multi:  # 5. qwen2vl-serve over both processes: process 0 serves, process 1 follows
        report["served"] = _serve(model_dir, flags, process_id)
        lap("serve")
    (out / f"{role}{process_id}.json").write_text(json.dumps(report))


def _serve(model_dir: Path, flags: list[str], process_id: int) -> dict:
    """Runs `qwen2vl-serve` (its main function) in this process; process 0 also sends the CLI's
    question and a text one at once through the openai client, then stops its server (SIGINT,
    as Ctrl-C would), which stops the follower too."""
    import base64
    import concurrent.futures
    import signal
    import threading

    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.serving.cli import main as serve_main

    port = _free_port()
    got: dict = {}

    def client():
        import httpx
        import openai

        try:
            for _ in range(600):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
            image = base64.b64encode((DEMO_DIR / "example.png").read_bytes()).decode()
            asks = [[{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                     {"type": "text", "text": "What shape is this?"}], "What colour is the shape?"]

            def ask(content):
                r = api.chat.completions.create(model="model", max_tokens=NEW_TOKENS, extra_body={"return_token_ids": True},
                                                messages=[{"role": "user", "content": content}])
                return r.choices[0].model_extra["token_ids"]

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                got["token_ids"] = list(pool.map(ask, asks))
            # two choices of one prefill, under a schema's token masks, with logprobs: the
            # follower replays the masks, the logprobs variant and the per-choice inserts
            schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}},
                      "required": ["shape"], "additionalProperties": False}
            r = api.chat.completions.create(
                model="model", max_tokens=40, n=2, temperature=1.0, seed=3, logprobs=True, top_logprobs=2,
                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
                messages=[{"role": "user", "content": "Which shape? Answer in JSON."}])
            got["structured"] = [{"content": c.message.content, "finish": c.finish_reason,
                                  "logprobs": len(c.logprobs.content)} for c in r.choices]
        except Exception as e:  # noqa: BLE001 - reported to the test
            got["error"] = repr(e)
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    if process_id == 0:
        threading.Thread(target=client, daemon=True).start()
    got["exit"] = serve_main(["--model", str(model_dir), "--mesh", GENERATE_MESH, "--port", str(port), "--max-batch", "2",
                              "--max-context", "256", "--no-vision-warm-up", "--no-grammar-warm-up", *flags])
    return got


# ---------------------------------------------------------------- running it
def _ours(stdout: str) -> str:
    """A process's stdout without Gloo's connection notes (its C++ side prints them there)."""
    return "".join(line for line in stdout.splitlines(keepends=True) if not line.startswith("[Gloo]"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    base = children.environ()  # the session's, as it started
    env = dict(base, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), QWEN2VL_COMPILE_CACHE="0",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), base.get("PYTHONPATH")) if p))
    for name in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "QWEN2VL_DISTRIBUTED"):
        env.pop(name, None)
    return env


def _start(role: str, out: Path, coordinator: str = "", process_id: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", role, str(out), coordinator, str(process_id)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(2 if role == "multi" else 4), cwd=out)


def _finish(procs: list[subprocess.Popen], deadline: float) -> list[tuple[int, str, str]]:
    """Waits for all (a process whose peer died would wait on it forever: past the deadline,
    or once one fails, the rest are killed)."""
    results: list = [None] * len(procs)
    try:
        while any(r is None for r in results):
            for i, p in enumerate(procs):
                if results[i] is None and p.poll() is not None:
                    results[i] = (p.returncode, *p.communicate())
                    if p.returncode != 0:
                        raise RuntimeError(f"process {i} failed")
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.2)
    except (RuntimeError, TimeoutError):
        for i, p in enumerate(procs):
            if results[i] is None:
                p.kill()
                results[i] = (p.wait(), *p.communicate())
    return results


def _run_all(job: Job, out: Path) -> dict:
    """The model and data written (a process of their own), then the two processes, then the
    one; -> what the tests read."""
    (prepared,) = _finish([job.track(_start("prepare", out))], time.monotonic() + TIMEOUT_S)
    assert prepared[0] == 0, prepared[2][-4000:]
    deadline = time.monotonic() + TIMEOUT_S
    coordinator = f"127.0.0.1:{_free_port()}"
    multi = [(code, _ours(stdout), err) for code, stdout, err in
             _finish([job.track(_start("multi", out, coordinator, i)) for i in range(2)], deadline)]
    for i, (code, _, err) in enumerate(multi):
        assert code == 0, f"process {i} of 2 exited with {code}:\n{err[-4000:]}"
    (single,) = _finish([job.track(_start("single", out))], deadline)
    assert single[0] == 0, single[2][-4000:]
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in ("multi0", "multi1", "single0")}
    return {"out": out, "multi": multi, "single": single, **reports}


# The runs go in the background from the start of the session (children.py), beside the tests
# that come before these.
CHILDREN = Children(__name__)
CHILDREN.add("runs", lambda: Job(lambda job: _run_all(job, children.folder("multiprocess"))), uses="runs")


@pytest.fixture(scope="module")
def runs():
    return CHILDREN.result("runs")


def test_two_processes_make_one_mesh(runs):
    assert runs["multi0"]["devices"] == [4, 2, 2, 0]
    assert runs["multi1"]["devices"] == [4, 2, 2, 1]
    assert runs["single0"]["devices"] == [4, 4, 1, 0]
    # the logits really spanned both processes (rows over data, vocabulary over tensor)
    spec, addressable = runs["multi0"]["logits_sharding"]
    assert "data" in spec and not addressable


def test_forward_and_greedy_generation_equal_one_process(runs):
    import numpy as np

    ref = np.asarray(runs["single0"]["logits"])
    assert ref.std() > 0.1  # real logits, not zeros
    for name in ("multi0", "multi1"):
        got = np.asarray(runs[name]["logits"])
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
        assert runs[name]["tokens"] == runs["single0"]["tokens"]
    assert len(runs["single0"]["tokens"]) == 4 and len(runs["single0"]["tokens"][0]) == NEW_TOKENS


def test_cli_prints_once_with_the_single_process_answer(runs):
    (code0, out0, err0), (code1, out1, err1) = runs["multi"]
    lines = out0.strip().splitlines()
    assert len(lines) == 1, out0  # one JSON object, from process 0 alone
    ours, ref = json.loads(lines[0]), json.loads(runs["single"][1].strip())
    assert ours["token_ids"] == ref["token_ids"] and ours["text"] == ref["text"]
    assert len(ours["token_ids"]) == NEW_TOKENS or ours["finish_reason"] == "stop"
    assert out1 == ""
    assert runs["multi0"]["cli_exit"] == runs["multi1"]["cli_exit"] == 0


def test_server_over_two_processes_answers_as_one_process(runs):
    served = runs["multi0"]["served"]
    assert "error" not in served, served
    assert served["exit"] == 0 and runs["multi1"]["served"]["exit"] == 0
    cli = json.loads(runs["single"][1].strip())  # the same question, one process with four devices
    assert served["token_ids"][0] == cli["token_ids"]
    # both answers, decoded together over two processes, equal greedy generate here on one device
    from qwen2vl_jax.api import Qwen2VL
    from qwen2vl_jax.chat import turn_end_ids
    from qwen2vl_jax.config import DEMO_DIR
    from qwen2vl_jax.processing import Processor

    folder = runs["out"] / "model"
    model, processor = Qwen2VL.from_pretrained(folder, dtype="float32"), Processor.from_pretrained(folder)
    questions = [[{"type": "image", "image": str(DEMO_DIR / "example.png")}, {"type": "text", "text": "What shape is this?"}],
                 [{"type": "text", "text": "What colour is the shape?"}]]
    assert len(served["token_ids"]) == len(questions), served
    for content, answer in zip(questions, served["token_ids"]):
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)
        eos = turn_end_ids(model, processor)
        want = [int(t) for t in model.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_ids=eos)[0]]
        end = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))  # through the first EOS
        assert answer == want[:end]
    # n, logprobs and a JSON schema's masks over two processes
    assert len(served["structured"]) == 2, served
    for choice in served["structured"]:
        assert json.loads(choice["content"])["shape"] in ("circle", "square") and choice["finish"] == "stop"
        assert choice["logprobs"] > 0


def test_training_equals_one_process_and_each_process_reads_its_share(runs):

    t0, t1, ref = runs["multi0"]["train"], runs["multi1"]["train"], runs["single0"]["train"]
    assert t0["exit"] == t1["exit"] == ref["exit"] == 0
    # each process read half of every step's records, and together all of them once
    mine0, mine1 = t0["read"][:4], t1["read"][:4]  # two steps of two rows each
    assert not set(mine0) & set(mine1)
    assert sorted(mine0 + mine1) == sorted(ref["read"][:8]) == list(range(8))
    # the logged losses (process 0's log) equal the single run's
    rows = lambda role: [json.loads(r) for r in (runs["out"] / f"run-{role}" / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    multi_rows, single_rows = rows("multi"), rows("single")
    assert [r["step"] for r in multi_rows] == [r["step"] for r in single_rows] == [1, 2]
    for a, b in zip(multi_rows, single_rows):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"]


def test_only_process_0_prints_and_writes(runs):
    (_, _, err0), (_, out1, err1) = runs["multi"]
    assert "step 2/2" in err0 and "stage 2" in err0
    assert out1 == "" and "step " not in err1 and "stage 2" not in err1
    assert runs["multi0"]["train"]["writes"]["losses"] > 0 and runs["multi0"]["train"]["writes"]["plot"] > 0
    assert runs["multi1"]["train"]["writes"] == {"losses": 0, "plot": 0}
    run = runs["out"] / "run-multi"
    header, *rows = (run / "losses.csv").read_text().splitlines()
    assert header == "step,loss" and len(rows) == 2  # one writer: no doubled rows
    assert (run / "loss.png").is_file() and (run / "params").is_dir()


def test_checkpoint_of_two_processes_restores_in_one(runs):
    r = runs["single0"]["restored"]
    assert r["step"] == 2 and r["position"] == {"epoch": 1, "index": 0}
    assert r["moved"] > 1e-4  # training changed the params, so equality below means something
    worst = max(r["param_err"].values())
    assert worst <= 1e-5, {k: v for k, v in r["param_err"].items() if v > 1e-5}
    assert r["opt_err"] <= 1e-5
    assert r["export_err"] == 0.0  # the exported params are the checkpoint's


# ---------------------------------------------------------------- the flags (in this process)
@pytest.mark.parametrize("argv, env, named", [
    (["--coordinator", "localhost:1234"], {}, ["--num-processes (or JAX_NUM_PROCESSES)",
                                               "--process-id (or JAX_PROCESS_ID)"]),
    ([], {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2"}, ["--process-id (or JAX_PROCESS_ID)"]),
    (["--num-processes", "2", "--process-id", "1"], {}, ["--coordinator (or JAX_COORDINATOR_ADDRESS)"]),
])
@pytest.mark.parametrize("tool", ["generate", "train"])
def test_missing_values_are_one_line(monkeypatch, capsys, tmp_path, argv, env, named, tool):
    from qwen2vl_jax import distributed

    monkeypatch.setattr(distributed, "cluster_manager", lambda: None)  # as on a workstation
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "QWEN2VL_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if tool == "generate":
        from qwen2vl_jax.cli import generate_main as main

        code = main(["--prompt", "hi", *argv])
    else:
        from qwen2vl_jax.train.cli import main

        code = main(["--model", str(tmp_path), "--data", "d.jsonl", "--stage", "3", "--steps", "1",
                     "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"qwen2vl-{tool}: error: a multi-process run needs {', '.join(named)}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, env, message", [
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], {},
     "--coordinator 'localhost' is not ADDR:PORT"),
    (["--coordinator", "h:99999", "--num-processes", "2", "--process-id", "0"], {}, "--coordinator 'h:99999' is not"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], {},
     "--process-id must be 0 .. 1 for 2 processes, got 2"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], {}, "--num-processes must be at least 1"),
    ([], {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' (--num-processes) is not a whole number"),
    (["--process-id", "3"], {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
     "--process-id must be 0 .. 1 for 2 processes, got 3"),
    ([], {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"},
     "JAX_PROCESS_ID must be 0 .. 1 for 2 processes, got -1"),
])
def test_bad_values_name_their_flag(argv, env, message):
    import argparse

    from qwen2vl_jax import distributed
    from qwen2vl_jax.errors import InputError

    args = distributed.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    with pytest.raises(InputError) as e:
        distributed.resolve(args, env, detect=lambda: None)
    assert str(e.value).startswith(message), str(e.value)


def test_resolve_reads_flags_before_the_environment():
    import argparse

    from qwen2vl_jax import distributed

    parse = distributed.add_arguments(argparse.ArgumentParser()).parse_args
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    none = lambda: None  # noqa: E731
    assert distributed.resolve(parse([]), {}, detect=none) is None  # one process
    assert distributed.resolve(parse([]), env, detect=none) == distributed.Cluster("10.0.0.2:1234", 4, 3)
    assert distributed.resolve(parse(["--process-id", "1"]), env, detect=none) == distributed.Cluster("10.0.0.2:1234", 4, 1)
    # a cluster manager (Cloud TPU, SLURM) fills in the rest, so nothing is missing there
    assert distributed.resolve(parse([]), {"QWEN2VL_DISTRIBUTED": "1"}, detect=none) == distributed.Cluster(None, None, None)
    assert distributed.resolve(parse(["--coordinator", "h:1"]), {}, detect=lambda: "SlurmCluster") == \
        distributed.Cluster("h:1", None, None)


def test_compile_cache_folder(tmp_path):
    import argparse

    from qwen2vl_jax import distributed
    from qwen2vl_jax.errors import InputError

    parse = distributed.add_arguments(argparse.ArgumentParser()).parse_args
    home = tmp_path / "xdg"
    default = home / "qwen2vl-jax" / "jax-cache"
    assert distributed.compile_cache_dir(parse([]), {"XDG_CACHE_HOME": str(home)}) == (default, "")
    assert distributed.compile_cache_dir(parse([]), {"XDG_CACHE_HOME": str(home), "QWEN2VL_COMPILE_CACHE": "1"})[0] == default
    assert distributed.compile_cache_dir(parse([]), {})[0] == Path.home() / ".cache" / "qwen2vl-jax" / "jax-cache"
    assert distributed.compile_cache_dir(parse([]), {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "j")})[0] == tmp_path / "j"
    for off in ("0", "off", "false"):
        assert distributed.compile_cache_dir(parse([]), {"QWEN2VL_COMPILE_CACHE": off})[0] is None
    assert distributed.compile_cache_dir(parse([]), {"QWEN2VL_COMPILE_CACHE": str(tmp_path / "e")})[0] == tmp_path / "e"
    moved = parse(["--compile-cache", str(tmp_path / "f")])
    assert distributed.compile_cache_dir(moved, {"QWEN2VL_COMPILE_CACHE": "0"})[0] == tmp_path / "f"
    assert distributed.compile_cache_dir(parse(["--no-compile-cache"]), {"QWEN2VL_COMPILE_CACHE": str(tmp_path)})[0] is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match=r"^--compile-cache .*file/c: cannot use it as the compile cache"):
        distributed.enable_compile_cache(parse(["--compile-cache", str(blocker / "c")]), {})
    with pytest.raises(InputError, match=r"^QWEN2VL_COMPILE_CACHE=.*file/c: cannot use it"):
        distributed.enable_compile_cache(parse([]), {"QWEN2VL_COMPILE_CACHE": str(blocker / "c")})


def test_shares_cover_each_micro_batch_once():
    from qwen2vl_jax.train.loader import Loader

    def share(me, count, batch, accum):
        loader = Loader.__new__(Loader)
        loader.processes, loader.batch_size = (me, count), batch
        return loader.share(batch * accum)

    assert share(0, 2, 4, 2) == [0, 1, 4, 5] and share(1, 2, 4, 2) == [2, 3, 6, 7]
    for count, batch in ((3, 8), (4, 2), (2, 1)):
        parts = [share(p, count, batch, 3) for p in range(count)]
        assert sorted(sum(parts, [])) == list(range(batch * 3))


if __name__ == "__main__":
    if sys.argv[1:3] == ["--worker", "prepare"]:
        _write_data(Path(sys.argv[3]) / "data")
        _write_model(Path(sys.argv[3]) / "model")
    elif sys.argv[1:2] == ["--worker"]:
        _worker(sys.argv[2], Path(sys.argv[3]), sys.argv[4] or None, int(sys.argv[5]))


def test_native_writes_to_stdout_go_to_stderr_once_joined():
    # The collectives' native code writes to descriptor 1 (Gloo's "connected to N peer ranks");
    # after joining a run, that lands on stderr while Python's prints stay on stdout.
    code = ("import os, sys\n"
            "from qwen2vl_jax import distributed\n"
            "print('before', flush=True)\n"
            "distributed._native_stdout_to_stderr()\n"
            "os.write(1, b'native chatter\\n')\n"
            "print('{\"answer\": 1}')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before", '{"answer": 1}']
    assert "native chatter" in done.stderr
