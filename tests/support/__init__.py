"""Helpers the tests share; the ``conftest.py`` files keep only fixtures and import from here.

``services`` (PostgreSQL and the CI rule), ``bundles`` (publisher keys, bundles made in code),
``control_plane`` (a real control plane on loopback), ``agents`` (agents in-process, load),
``fleet`` (agent processes and traffic), ``broker`` (a mosquitto of a test's own),
``containers`` (PostgreSQL and brokers from containers, and when to use them), ``compose`` (the
product images and a compose project). What the
benches use too (tiny models, loopback proxies) lives in ``bench/devkit/``, which both import;
neither imports the other.
"""
