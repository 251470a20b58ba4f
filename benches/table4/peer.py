"""The client of the RecBole peer process (`benches/peers/recbole_peer.py`, run by the
python of its own venv): the samples it trains on, written as an .npz, and the process
itself, one JSON request and one JSON reply a line over its stdin/stdout.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np


class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed, does not start): its rows are skipped."""


class PeerError(RuntimeError):
    """The peer ran and failed (a real failure of the measured step)."""


def write_peer_samples(path: Path, samples, order: Sequence[np.ndarray], n_items: int) -> dict:
    """Write the samples at the concatenated `order` batches, plus the longest prefix of
    all `samples` (so the peer pads as a full epoch does), as an .npz for the peer."""
    idx = np.concatenate([np.asarray(b, dtype=np.int64) for b in order]) if len(order) else np.zeros(0, np.int64)
    sub = samples.select(idx)
    lens = samples.prefixes.lengths
    k = int(np.argmax(lens))
    np.savez(path, offsets=sub.prefixes.offsets, items=sub.prefixes.items, targets=sub.targets,
             n_items=np.int64(n_items), longest_prefix=samples.prefixes[k].astype(np.int64),
             longest_target=np.int64(samples.targets[k]))
    return {"rows": int(idx.size), "longest_prefix": int(lens[k])}


class PeerProcess:
    """A running `benches/peers/recbole_peer.py`: one JSON request, one JSON reply."""

    def __init__(self, python: str, script: Path, samples_npz: Path, *, threads: int, device: str, batch: int,
                 hidden: int, seed: int, shuffle: bool, log_path: Path, timeout_s: float = 900.0,
                 blocks: int = 1, heads: int = 1, gnn_steps: int = 1):
        if not python or not Path(python).exists():
            raise PeerUnavailable(f"MTD_BENCH_RECBOLE_PYTHON={python!r} does not exist")
        self.timeout_s = timeout_s
        self.log_path = log_path
        self._log = open(log_path, "w")
        cmd = [python, str(script), "--samples", str(samples_npz), "--threads", str(threads), "--device", device,
               "--batch", str(batch), "--hidden", str(hidden), "--seed", str(seed), "--shuffle", str(int(shuffle)),
               "--blocks", str(blocks), "--heads", str(heads), "--gnn-steps", str(gnn_steps)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env)
        try:
            self.hello = self._read()
        except PeerError as exc:
            self.close()
            raise PeerUnavailable(f"the RecBole peer did not start: {exc}") from None
        if not self.hello.get("ok"):
            self.close()
            raise PeerUnavailable(f"the RecBole peer did not start: {self.hello.get('error')}")

    def _stderr_tail(self, n: int = 15) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def _read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not ready:
            raise PeerError(f"no answer within {self.timeout_s:.0f} s (log {self.log_path})")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            raise PeerError(f"the peer exited with code {code}; its stderr ends:\n{self._stderr_tail()}")
        return json.loads(line)

    def request(self, cmd: str, **kw) -> dict:
        if self.proc.poll() is not None:
            raise PeerError(f"the peer is not running (exit code {self.proc.returncode}):\n{self._stderr_tail()}")
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        rep = self._read()
        if not rep.get("ok"):
            raise PeerError(f"{cmd}: {rep.get('error')}\n{rep.get('trace', '')}")
        return rep

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()
