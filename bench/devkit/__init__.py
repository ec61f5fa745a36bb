"""What the tests and the benchmarks both stand on; not shipped (see pyproject's packages).

``models``: tiny ONNX and TFLite models made in code. ``proxies``: reverse proxies on loopback
that cut, count or replace what passes. ``tests/`` and ``bench/`` import from here and never
from each other.
"""
