"""benchmarks/serve.py's side-by-side plumbing that runs without a server: the one-line refusals
of --peer before any work, and the memory of a process tree (vLLM's server, engine and worker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve


def test_peer_without_vllm_python_is_one_line(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(SystemExit) as e:
        serve.main(["--peer", "vllm", "--vllm-python", str(missing)])
    message = str(e.value.code)
    assert message.startswith(f"serve.py: --peer vllm needs vLLM's CPU build: no Python at {missing}")
    assert "\n" not in message
    assert not any(tmp_path.glob("**/model-*"))  # refused before making a model folder


def test_compare_and_peer_are_refused_together():
    with pytest.raises(SystemExit) as e:
        serve.main(["--peer", "vllm", "--compare", "prefill-chunk=512,0"])
    assert str(e.value.code) == "serve.py: --compare and --peer go one at a time"


def test_tree_rss_counts_children():
    # a child holding ~200 MB: the tree's figure must include it, this process's alone must not
    code = "import sys; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print(1, flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "1"  # its memory is touched
        own, tree = serve.rss_gb(os.getpid()), serve.tree_rss_gb(os.getpid())
        assert tree >= own + 0.15, (own, tree)
        assert serve.tree_rss_gb(child.pid) >= 0.15
    finally:
        child.stdin.close()
        child.wait(30)
