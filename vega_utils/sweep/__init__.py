"""Sweeps: the search space (space.py), the Optuna study on shared storage (study.py), a worker that
trains trials as ordinary runs (worker.py), the sweep's report (report.py) and worker slots for several
runs at once on one machine (parallel.py)."""
