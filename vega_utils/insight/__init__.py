"""Insight into runs: metrics, prediction files, plots and multi-seed summaries (report.py), live TensorBoard curves
(live.py), anchor alignment (alignment.py), a finished run's analysis (analyze.py, with its maps in anchor_maps.py and
breakdowns in breakdown.py), runs compared with paired significance tests (compare.py, stats.py), and a recording's
predicted emotions as a CSV and subtitles (emotions.py) and as a timeline picture (timeline.py)."""
