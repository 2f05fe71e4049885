"""``keystile demo`` turns the console on, prints its address and an admin token that signs in."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from playwright.sync_api import Browser, expect


def test_demo_prints_a_console_that_signs_in(browser: Browser) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", "0", "--admin-port", "0", "--console-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while not any("admin token:" in line for line in lines):
            assert time.monotonic() < deadline, "demo did not print its console"
            line = proc.stdout.readline()
            assert line, f"demo exited: {proc.stderr.read() if proc.stderr else ''}"
            lines.append(line)
        text = "".join(lines)
        url = re.search(r"(http://127\.0\.0\.1:\d+)/\n", text)
        token = re.search(r"admin token:\s+(\S+)", text)
        assert url and token
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(url.group(1) + "/")
        page.fill("#token", token.group(1))
        page.click("button[type=submit]")
        expect(page.get_by_test_id("who")).to_contain_text("Operator")
        page.get_by_test_id("filters").locator("select[name=principal]").select_option("demo-user")
        page.get_by_test_id("filters").get_by_role("button", name="Show").click()
        expect(page.get_by_test_id("keys")).to_contain_text("demo key")
        ctx.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)  # reads and closes both pipes
