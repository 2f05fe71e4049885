"""Finding (or installing) wrk, nginx and HAProxy, and describing the machine.

Installation uses Debian packages through apt-get, only for what is missing, and says so first.
Installing never starts or configures the system services for us: the harness runs its own
processes with its own config files (see ``configs``).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata

PACKAGES = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy"}
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for d in SBIN:  # nginx and haproxy live in sbin, often not on a user's PATH
        candidate = os.path.join(d, tool)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_tools(tools: list[str], *, install: bool = True) -> dict[str, str | None]:
    """Paths of ``tools``; the missing ones are installed with apt-get when possible."""
    found = {t: which(t) for t in tools}
    missing = [t for t, p in found.items() if p is None]
    if missing and install:
        apt = shutil.which("apt-get")
        pkgs = [PACKAGES[t] for t in missing]
        if apt is None:
            print(f"missing {', '.join(missing)} and no apt-get here: install them", file=sys.stderr)
        elif os.geteuid() != 0:
            print(
                f"missing {', '.join(missing)}: run `sudo apt-get install -y {' '.join(pkgs)}`",
                file=sys.stderr,
            )
        else:
            print(
                f"installing Debian packages {', '.join(pkgs)} with apt-get "
                "(the harness uses its own configs; it does not use the system services) ...",
                file=sys.stderr,
            )
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run([apt, "update", "-q"], env=env, check=False, timeout=600)
            subprocess.run([apt, "install", "-y", "-q", *pkgs], env=env, check=False, timeout=900)
            found = {t: which(t) for t in tools}
    return found


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else ""


def tool_version(tool: str, path: str | None) -> str:
    if path is None:
        return "not installed"
    if tool == "nginx":
        return _first_line([path, "-v"]).removeprefix("nginx version: ").removeprefix("nginx/")
    if tool == "haproxy":
        m = re.search(r"version (\S+)", _first_line([path, "-v"]))
        return m.group(1) if m else "?"
    if tool == "wrk":
        m = re.search(r"wrk (\S+)", _first_line([path, "-v"]))
        return m.group(1) if m else "?"
    return "?"


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(tool_paths: dict[str, str | None]) -> dict[str, str | int]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "usable_cores": len(os.sched_getaffinity(0)),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_release(),
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "keystile": _pkg("keystile"),
        "aiohttp": _pkg("aiohttp"),
        "uvloop": _pkg("uvloop"),
        "msgspec": _pkg("msgspec"),
        "redis-py": _pkg("redis"),
        **{t: tool_version(t, tool_paths.get(t)) for t in ("nginx", "haproxy", "wrk")},
    }


def _os_release() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def describe(m: dict[str, str | int]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['kernel']} ({m['os']}); "
        f"Python {str(m['python']).split(' ')[1]}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, "
        f"msgspec {m['msgspec']}; nginx {m['nginx']}, HAProxy {m['haproxy']}, wrk {m['wrk']}; "
        f"keystile {m['keystile']}"
    )
