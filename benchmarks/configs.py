"""Config files for the servers the harness starts: nginx, HAProxy and Keystile.

Everything lives in the run's temp directory: own pid, log and temp paths, loopback ports, nginx
with ``daemon off`` and HAProxy with ``-db`` so both stay in the foreground under our control. The
system's /etc/nginx and /etc/haproxy are never read or written (nginx gets ``-p``/``-c``/``-e``).
"""

from __future__ import annotations

import json
from pathlib import Path

OWNER = "bench"  # the identity every peer forwards (Keystile's principal is named the same)
OWNER_HEADER = "X-Keystile-Owner"

# Echoed by the upstream at /_bench/echo so a preflight can see what a proxy forwarded.
_ECHO = (
    "owner=$http_x_keystile_owner principal=$http_x_keystile_principal key=$http_x_api_key\\n"
)


def _nginx_common(tmp: Path, name: str) -> str:
    t = tmp / name
    t.mkdir(parents=True, exist_ok=True)
    return f"""\
worker_processes 1;
daemon off;
master_process on;
pid {t}/nginx.pid;
error_log {t}/error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 16384;
    multi_accept on;
}}
"""


def _nginx_http_common(tmp: Path, name: str) -> str:
    t = tmp / name
    return f"""\
    access_log off;
    client_body_temp_path {t}/client_body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server_tokens off;
"""


def nginx_upstream(tmp: Path, name: str, port: int) -> Path:
    """nginx ``return 200``: the upstream of every proxy, and the "upstream alone" peer."""
    conf = tmp / f"{name}.conf"
    conf.write_text(
        _nginx_common(tmp, name)
        + "http {\n"
        + _nginx_http_common(tmp, name)
        + f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type text/plain;
        location = /_bench/echo {{ return 200 "{_ECHO}"; }}
        location /open/_bench/echo {{ return 200 "{_ECHO}"; }}
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
    )
    return conf


def nginx_keyauth(tmp: Path, name: str, port: int, upstream_port: int, keys: list[str]) -> Path:
    """nginx as the key-auth proxy: ``map`` on X-API-Key, 401 when unknown, owner forwarded."""
    keymap = tmp / f"{name}-keys.map"
    keymap.write_text("".join(f'"{k}" "{OWNER}";\n' for k in keys))
    conf = tmp / f"{name}.conf"
    conf.write_text(
        _nginx_common(tmp, name)
        + "http {\n"
        + _nginx_http_common(tmp, name)
        + f"""\
    map_hash_bucket_size 128;
    map_hash_max_size {max(2048, 2 * len(keys))};
    map $http_x_api_key $owner {{
        default "";
        include {keymap};
    }}
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            if ($owner = "") {{ return 401; }}
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header {OWNER_HEADER} $owner;
            proxy_set_header X-API-Key "";
        }}
    }}
}}
"""
    )
    return conf


def nginx_argv(nginx: str, tmp: Path, name: str, conf: Path) -> list[str]:
    t = tmp / name
    return [nginx, "-p", str(t), "-c", str(conf), "-e", str(t / "error.log")]


def haproxy_keyauth(tmp: Path, name: str, port: int, upstream_port: int, keys: list[str]) -> Path:
    """HAProxy doing the same: a map file, 401 when unknown, owner forwarded, keep-alive upstream."""
    keymap = tmp / f"{name}-keys.map"
    keymap.write_text("".join(f"{k} {OWNER}\n" for k in keys))
    conf = tmp / f"{name}.cfg"
    conf.write_text(
        f"""\
global
    nbthread 1
    maxconn 4096
    pidfile {tmp}/{name}.pid

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always

frontend keyauth
    bind 127.0.0.1:{port}
    http-request set-var(txn.owner) req.hdr(x-api-key),map({keymap})
    http-request deny deny_status 401 unless {{ var(txn.owner) -m found }}
    http-request del-header X-API-Key
    http-request set-header {OWNER_HEADER} %[var(txn.owner)]
    default_backend bench_upstream

backend bench_upstream
    server up 127.0.0.1:{upstream_port}
"""
    )
    return conf


def haproxy_argv(haproxy: str, conf: Path) -> list[str]:
    return [haproxy, "-f", str(conf), "-db"]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for anything we write
    raise TypeError(f"no TOML form for {value!r}")


def keystile_config(
    tmp: Path,
    name: str,
    *,
    port: int,
    admin_port: int,
    upstream_port: int,
    store_db: Path,
    redis_url: str,
    local_ttl: float | None,
    redis_namespace: str = "keystile",
    limited_route: bool = True,
) -> Path:
    """A Keystile config: ``/open`` with auth = "none", everything else auth = "required".

    ``local_ttl = 0`` turns the in-process cache off; ``redis_url = ""`` the Redis tier. Access
    logs are off, as for nginx and HAProxy. ``redis_namespace`` prefixes every Redis key (and the
    invalidation channel): one of its own per benchmark run starts Redis cold, whatever earlier
    runs left there, without deleting anything. ``limited_route = False`` leaves out ``/limited``
    (a baseline from before rate limits refuses its ``limits`` field).
    """
    sections: dict[str, dict[str, object]] = {
        "proxy": {"listen": f"127.0.0.1:{port}"},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "keys": {"prefix": "ks"},
        "store": {"url": f"sqlite:///{store_db}"},
        "redis": {"url": redis_url, "channel": f"{redis_namespace}:invalidate"},
        "logging": {"level": "warning", "access_log": False},
    }
    if local_ttl is not None:
        sections["cache"] = {"local_ttl": local_ttl}
    upstream = f"http://127.0.0.1:{upstream_port}"
    lines = [f"# generated by benchmarks/run.py for scenario server {name}"]
    for section, values in sections.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
    for prefix, auth in (("/open", "none"), ("/", "required")):
        lines += ["", "[[routes]]", f"prefix = {_toml(prefix)}", f"upstream = {_toml(upstream)}"]
        lines.append(f"auth = {_toml(auth)}")
    if limited_route:
        # The `limited` scenarios: a route behind a limit no run can reach, and its twin without
        # one (a prefix of the same length, so only the limit differs).
        lines += ["", "[[routes]]", 'prefix = "/limited"', f"upstream = {_toml(upstream)}"]
        lines.append('limits = [{ name = "never", limit = 1000000000, window = "1d" }]')
        lines += ["", "[[routes]]", 'prefix = "/nolimit"', f"upstream = {_toml(upstream)}"]
    conf = tmp / f"{name}.toml"
    conf.write_text("\n".join(lines) + "\n")
    return conf
