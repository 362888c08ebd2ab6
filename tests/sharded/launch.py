"""Launch ``tests.sharded.run_guards`` as users launch multi-process runs: ``python -m`` (Lightning re-runs the script
per rank), ``torchrun``, and two ``torchrun`` "nodes" on 127.0.0.1. Each launch is bounded by a timeout, so a hang
(a collective that one rank never joins) fails its test instead of the suite."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240
SCRIPT = "tests.sharded.run_guards"


def _env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    return env


def _result(out: Path, procs: list[subprocess.CompletedProcess[str]], script: str) -> dict[str, Any]:
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-4000:]
    if script == SCRIPT:
        return json.loads((out / "result.json").read_text())
    return torch.load(out / "cell.pt", weights_only=False)  # tests.contract.run_cell


def launch(strategy: str, out: Path, *extra: str, script: str = SCRIPT) -> dict[str, Any]:
    """``python -m <script>`` (default ``tests.sharded.run_guards``): Lightning starts the second rank itself."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", script, "--strategy", strategy, "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    return _result(out, [proc], script)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(out: Path, *extra: str, nodes: int = 1, script: str = SCRIPT) -> dict[str, Any]:
    """``torchrun`` with 2 processes on one node, or ``nodes`` launches of one process each (``--nnodes``)."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    per_node = 2 // nodes
    launches = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={per_node}", f"--nnodes={nodes}"]
        cmd += [f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        cmd += ["-m", script, "--strategy", "ddp", "--out", str(out), "--devices", str(per_node), "--nodes", str(nodes)]
        launches.append(
            subprocess.Popen(
                [*cmd, *extra], cwd=out, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    procs = []
    try:
        for p in launches:
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            procs.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in launches:
            p.kill()
    return _result(out, procs, script)


def close(a: dict[str, list[float]], b: dict[str, list[float]], atol: float) -> list[str]:
    """Names of the parameters of two runs that differ by more than ``atol`` anywhere."""
    return [n for n in a if not torch.allclose(torch.tensor(a[n]), torch.tensor(b[n]), atol=atol, rtol=0)]
