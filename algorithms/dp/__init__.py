"""Differential privacy for fedloom's aggregators (issue 12).

``gaussian``: clipping one site's contribution and the Gaussian mechanism on a sum;
``discrete_gaussian``: the discrete Gaussian sampler secure-aggregation members use for
distributed noise; ``ledger``: the privacy ledger and ε at δ (dp-accounting, the
``privacy`` extra, imported lazily); ``release``: what a root aggregator calls at a flush
(central DP with a persisted, enforced budget) and the ``[privacy]`` parameters.
"""
