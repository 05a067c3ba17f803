"""Load runs and the scaling experiment: the API, Locust and workers as real processes, measured.

``python -m projectionist.experiment.load`` is ``make load``;
``python -m projectionist.experiment.scale`` is ``make scale-experiment``.
"""
