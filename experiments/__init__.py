"""Load runs and the scaling experiment: the API, Locust and workers as real processes, measured.

``python -m experiments.load`` is ``make load``;
``python -m experiments.scale`` is ``make scale-experiment``.
"""
