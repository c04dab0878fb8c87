"""Test helpers for the service: uvicorn in a thread, a `covidcxr serve` process and a free port for it, and the
benchmark's random-weights run and chest-like PNG (loaded from benchmarks/bench_serve.py, so tests and benchmark serve
the same thing)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI

from conftest import CLI_TIMEOUT_S, start_cli


def benchmark(name: str):
    """benchmarks/NAME.py as a module (tests use the benchmarks' runs, images and logs, so both see the same)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_serve():
    """benchmarks/bench_serve.py as a module."""
    return benchmark("bench_serve")


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cli(*args: str) -> subprocess.Popen:
    """`covidcxr serve ARGS` left running, without $COVIDCXR_TOKEN: a token must come from the arguments."""
    return start_cli("serve", *args, env={"COVIDCXR_TOKEN": None})


def wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float = CLI_TIMEOUT_S) -> None:
    """Wait until the server at `url` answers /api/health; fail with its stderr if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            httpx.get(f"{url}/api/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"covidcxr serve did not answer on {url}")


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", timeout_s: float = 20.0) -> Iterator[str]:
    """Run uvicorn on a free loopback port in a daemon thread; yield its base URL; stop it on exit."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
