"""After training: the beta-sweep report and frontier plots (report.py) and the best-of-n baseline (best_of_n.py)."""
