"""fedloom: asynchronous, peer-to-peer and hierarchical federated learning for hospitals.

The repository keeps its packages at its root (``algorithms/``, ``transport/``, ...); this
package links them under one installable namespace, so ``fedloom`` is the only top-level
name a wheel installs.
"""
