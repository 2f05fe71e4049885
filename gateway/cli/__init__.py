"""The ``keystile`` command line: serve, check config, migrate, principals, keys, audit, demo.

Owns: ``main`` (the entry point: parse, run one command, turn its failure into a message and an exit
code). The parts: ``parser`` (every command and flag), ``server_commands`` (serve, demo, config
check, migrate, reload, secret), ``admin_commands`` (principals, keys, audit: the admin API's
operations over HTTP or on the store), ``output`` (tables, escaping, ``--json``), ``flags`` (flag
text to values) and ``runner`` (the event loop, the one place that installs uvloop; config; ``Fail``).
Must not: hold lifecycle rules (``gateway.lifecycle`` does) or read the environment itself
(``gateway.config`` does).

Exit codes: 0 success, 1 operation failed (store, network, policy), 2 bad config or usage.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gateway.cli.parser import build_parser
from gateway.cli.runner import Fail
from gateway.config import ConfigError
from gateway.lifecycle import PolicyError
from gateway.store import StoreError

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare ``keystile``: what it can do
        parser.print_help()
        return 0
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # told with the usage of the command they were given to
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code: int = args.fn(args)
        return code
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    except PolicyError as e:
        print(f"keystile: {e.field}: {e}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"keystile: {e}", file=sys.stderr)
        return 1
    except Fail as e:
        print(str(e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
