"""Keystile's benchmark harness: peers, scenarios, the smoke check and micro-benchmarks.

Run ``python -m benchmarks.run --quick`` (see ``benchmarks/README.md``). Nothing here is imported
by the gateway; the harness only uses Keystile's public pieces (``gateway.keys``, the store) to
seed keys and the ``keystile`` command to serve them.
"""
