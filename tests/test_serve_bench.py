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


def test_summary_pools_every_gap_for_the_inter_token_latency():
    # three stalls among 200 gaps: each request's average (TPOT) hides them, the pooled p99 (ITL) does not
    steady = {"ok": True, "ttft": 1.0, "tpot": 0.1, "tokens": 101, "gaps": [0.1] * 100}
    stalled = {"ok": True, "ttft": 1.0, "tpot": 0.16, "tokens": 101, "gaps": [0.1] * 97 + [2.1] * 3}
    r = serve.summary([steady, stalled, {"ok": False}], clients=2, wall=10.0)
    assert (r["requests"], r["failed"]) == (3, 1)
    assert r["tpot_p99"] < 0.2
    assert r["itl_p99"] == pytest.approx(2.1)
