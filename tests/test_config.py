from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.config import Config, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "k.toml"
    p.write_text(text)
    return p


def test_defaults_when_no_file() -> None:
    cfg = config.load(None, env={})
    assert cfg == Config()
    assert cfg.admin.listen.startswith("127.0.0.1:")


def test_every_problem_is_reported_with_file_and_field(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
[proxy]
listen = 8080
lisen = "x"
[upstream]
read_timeout = -1
[bogus]
a = 1
[[routes]]
prefix = "api"
upstream = "ftp://x"
[[routes]]
prefix = "/x"
upstream = "http://u"
auth = "sometimes"
""",
    )
    with pytest.raises(ConfigError) as e:
        config.load(p, env={})
    text = "\n".join(e.value.problems)
    assert (f"{p}: proxy" in text and "lisen" in text) or "listen" in text
    assert f"{p}: upstream.read_timeout" in text
    assert f"{p}: bogus: unknown section" in text
    assert f"{p}: routes[1].auth" in text
    assert len(e.value.problems) >= 4


def test_semantic_problems_are_all_reported(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
[keys]
prefix = "Bad_Prefix"
[store]
url = "mysql://x"
[[routes]]
prefix = "api"
upstream = "ftp://x"
[[routes]]
prefix = "/y"
upstream = "http://u"
auth = "none"
scopes = ["a"]
""",
    )
    with pytest.raises(ConfigError) as e:
        config.load(p, env={})
    fields = [line.split(": ")[1] for line in e.value.problems]
    assert fields == [
        "keys.prefix",
        "store.url",
        "routes[0].prefix",
        "routes[0].upstream",
        "routes[1].scopes",
    ]


def test_redis_url_options_are_checked_without_echoing_the_password(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
[redis]
url = "rediss://:hunter2@cache:6380/1?ssl_ca_certs=/ca.pem&socket_timeout=2&ssl_ciphers=ALL"
""",
    )
    with pytest.raises(ConfigError) as e:
        config.load(p, env={})
    text = "\n".join(e.value.problems)
    assert "hunter2" not in text
    assert f"{p}: redis.url: unsupported option 'ssl_ciphers'" in text
    assert "'socket_timeout': use redis.socket_timeout" in text
    assert len(e.value.problems) == 2  # ssl_ca_certs and the database are fine
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, '[redis]\nurl = "http://:hunter2@cache"\n'), env={})
    assert "hunter2" not in e.value.problems[0] and "unsupported scheme 'http'" in e.value.problems[0]


def test_environment_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, '[store]\nurl = "sqlite:///a.db"\n')
    cfg = config.load(
        p,
        env={
            "KEYSTILE_STORE__URL": "postgresql://db/ks",
            "KEYSTILE_UPSTREAM__READ_TIMEOUT": "7.5",
            "KEYSTILE_PROXY__KEY_HEADERS": '["X-Key"]',
            "KEYSTILE_LOGGING__ACCESS_LOG": "false",
        },
    )
    assert cfg.store.url == "postgresql://db/ks"
    assert cfg.upstream.read_timeout == 7.5
    assert cfg.proxy.key_headers == ("X-Key",)
    assert cfg.logging.access_log is False


def test_unknown_environment_override_is_an_error() -> None:
    with pytest.raises(ConfigError) as e:
        config.load(None, env={"KEYSTILE_STORE__URLL": "x"})
    assert e.value.problems == ["KEYSTILE_STORE__URLL (environment): no setting store.urll"]


def test_secrets_required_and_never_in_repr() -> None:
    cfg = Config()
    with pytest.raises(ConfigError) as e:
        config.load_secrets(cfg, env={})
    assert "KEYSTILE_KEY_HASH_SECRET" in e.value.problems[0]
    s = config.load_secrets(
        cfg, env={"KEYSTILE_KEY_HASH_SECRET": "k" * 40, "KEYSTILE_ADMIN_TOKENS": "a" * 20 + "," + "b" * 20}
    )
    assert len(s.admin_tokens) == 2
    assert "k" * 40 not in repr(s) and "a" * 20 not in repr(s)


def test_config_check_command_prints_one_line_per_problem(tmp_path: Path) -> None:
    p = write(tmp_path, '[proxy]\nlisten = "nope"\nwhoami_path = "x"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", str(p)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"{p}: proxy.listen: expected host:port, got 'nope'",
        f"{p}: proxy.whoami_path: must start with /",
    ]
    assert "Traceback" not in r.stderr
    good = write(tmp_path, '[store]\nurl = "postgresql://u:hunter2@db/ks"\n')
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "check", str(good)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout and "****" in r.stdout
