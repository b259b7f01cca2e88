"""Everything around the method, one package per kind of job. Imports point down: no package here imports one
listed above it.

- common.py   the user-facing error and its exit, one-line argument errors, devices, seeds, atomic writes
- data/       what a dataset is, reading and checking data files (pickle and open .npz), conversion, synthetic data
- features/  features from raw conversations: text, audio and video of each utterance into the open format
- anchors/    the anchor cache: the bank of CLIP image features per class, and building it from face images
- runs/       one run on disk: its config, checkpoints, run folder, skipped steps, CPU threads
- insight/    looking at runs: metrics and reports, live curves, anchor alignment, analysis, breakdowns, comparison
- sweep/      many runs: the search space, the Optuna study, workers, the sweep report, parallel slots
"""
