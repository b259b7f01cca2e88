"""Runs: the one run configuration (config.py) and what each key means (config_help.py), checkpoints
(checkpoint.py), a run folder on disk (run_folder.py), skipping a step whose loss or gradient is not finite
(step_guard.py) and the CPU threads of a run (threads.py)."""
