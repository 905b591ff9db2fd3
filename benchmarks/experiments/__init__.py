"""Experiments that reproduce the Monolith paper's claims on this library's own pipelines.

    python -m benchmarks.experiments collision --json   # collisionless vs. MD5-hashed ids
    python -m benchmarks.experiments sync --json        # online vs. batch, sync intervals
    python -m benchmarks.experiments filter --json      # occurrence threshold and expiry
    python -m benchmarks.experiments peers --json       # river, daily-retrained Keras

Each prints one JSON object and writes a PNG (``--plot``); ``--quick`` runs on small data
in well under a minute each (``tests/test_experiments.py``). ``docs/experiments.md`` holds
the full runs' numbers and plots. See ``common`` for what they share.
"""
