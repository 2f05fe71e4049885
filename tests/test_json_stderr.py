"""Every line a serving Keystile writes to stderr is one JSON object: its own logs, third-party
loggers, Python warnings and uncaught exceptions, with one worker or several."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.observability import configure_logging
from tests.integration.test_workers import env, migrated_config
from tests.servers import wait_tcp
from tests.upstream import RecordingUpstream


@pytest.fixture
def json_stderr() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    stream = io.StringIO()
    configure_logging("info", stream)
    yield stream
    logging.captureWarnings(False)
    root.handlers[:], root.level, sys.excepthook, threading.excepthook = saved


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_warnings_third_party_logs_and_thread_crashes_are_json(json_stderr: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library complains", UserWarning, stacklevel=1)
    logging.getLogger("some.library").warning("plain text from a library")

    def boom() -> None:
        raise RuntimeError("thread crashed")

    t = threading.Thread(target=boom, name="worker-thread")
    t.start()
    t.join()
    lines = _lines(json_stderr)
    by_logger = {str(line["logger"]): line for line in lines}
    assert "a library complains" in str(by_logger["py.warnings"]["message"])
    assert by_logger["some.library"]["message"] == "plain text from a library"
    crash = by_logger["keystile.crash"]
    assert "worker-thread" in str(crash["message"]) and "thread crashed" in str(crash["exception"])


@pytest.mark.slow
async def test_serve_with_two_workers_writes_only_json(tmp_path: Path, upstream: RecordingUpstream) -> None:
    cfg, port, _ = migrated_config(tmp_path, upstream)
    log = tmp_path / "stderr.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "2"],
            env=env(), stdout=subprocess.DEVNULL, stderr=f,
        )
    try:
        wait_tcp(port, 20)
        deadline = time.monotonic() + 20
        while log.read_text().count('"keystile started"') < 2:  # both workers up
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    err = log.read_text()
    lines = err.splitlines()
    assert sum('"keystile stopped"' in line for line in lines) == 2, err[-2000:]
    for line in lines:
        assert line.startswith("{"), f"not JSON: {line!r}"
        json.loads(line)
