"""Sweeps: the search space (sweep_space.py), the Optuna study on shared storage (sweep_study.py), a worker that
trains trials as ordinary runs (sweep_worker.py), the sweep's report (sweep_report.py) and worker slots for several
runs at once on one machine (parallel.py)."""
