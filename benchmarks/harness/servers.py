"""Benchmark servers: start one vLLM / vllm-stateful server on a free loopback port, wait until it
answers, and stop its whole process group. Shared by every A/B script in benchmarks/."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from harness import REPO_ROOT


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ManagedServer:
    """A server subprocess in its own process group; ``stop`` ends that group and nothing else."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log_path: Path, base_url: str) -> None:
        self.argv = list(argv)
        self.base_url = base_url
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        try:
            self._proc = subprocess.Popen(
                self.argv,
                env={**os.environ, **env},
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO_ROOT,
            )
        except BaseException:
            self._log.close()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        """Return once ``/health`` and ``/v1/models`` answer 200. Raises RuntimeError (with the log
        tail) if the process exits first or ``timeout_s`` passes."""
        root = self.base_url.rsplit("/v1", 1)[0]
        deadline = time.monotonic() + timeout_s
        pending = [f"{root}/health", f"{self.base_url}/models"]
        while pending:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited with {self._proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout_s:.0f}s\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(pending[0], timeout=5) as resp:
                    if resp.status == 200:
                        pending.pop(0)
                        continue
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)

    @property
    def pid(self) -> int:
        """The server's process (and process group) id."""
        return self._proc.pid

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGINT, then SIGTERM, then SIGKILL to the server's process group; waits for the leader."""
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self._proc.poll() is not None:
                break
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self._proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        try:  # children left in the group (engine core) after the leader exited
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_argv(
    kind: str, model_path: str, served_name: str, port: int, args: Sequence[str], host: str = "127.0.0.1"
) -> list[str]:
    """argv for ``kind`` = ``vllm`` (stock OpenAI server) or ``stateful`` (vllm-stateful serve)."""
    if kind == "vllm":
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path]
    elif kind == "stateful":
        head = [sys.executable, "-m", "vllm_stateful.cli", "serve", model_path]
        if not any(a.startswith("--state-dir") or '"state_dir"' in a for a in args):
            # a fresh state dir per server: sessions of an earlier run must not be restored into this one
            args = [*args, "--state-dir", tempfile.mkdtemp(prefix="vllm-stateful-bench-state-")]
    else:
        raise ValueError(f"server kind must be vllm or stateful, got {kind!r}")
    return [*head, "--served-model-name", served_name, "--host", host, "--port", str(port), *args]


@contextmanager
def launched_server(
    kind: str,
    model_path: str,
    served_name: str,
    args: Sequence[str],
    log_path: Path,
    env: dict[str, str],
    startup_timeout_s: float = 900,
    pids: list[int] | None = None,
) -> Iterator[str]:
    """Run one server for the ``with`` block; yields its ``.../v1`` base URL once it answers
    (and appends the server's process id to ``pids`` if given, e.g. for a profiler)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    with ManagedServer(serve_argv(kind, model_path, served_name, port, args), env, log_path, base) as server:
        server.wait_ready(startup_timeout_s)
        if pids is not None:
            pids.append(server.pid)
        yield base
