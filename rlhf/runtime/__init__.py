"""What runs around the training math: the Accelerator and launch checks (accelerator.py), distributed helpers
(distributed.py), atomic checkpoints (checkpoint.py), metrics sinks (tracking.py), the run-folder lock
(runlock.py) and the one-line user errors of the scripts (errors.py)."""
