"""Helpers the tests share; the ``conftest.py`` files keep only fixtures and import from here.

``services`` (PostgreSQL and the CI rule), ``bundles`` (publisher keys, bundles made in code),
``control_plane`` (a real control plane on loopback), ``agents`` (agents in-process, proxies,
load), ``fleet`` (agent processes and traffic). The tiny models live in ``toymodels`` at the top
of the checkout, which the benches share.
"""
