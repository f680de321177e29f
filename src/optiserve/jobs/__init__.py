"""Jobs: optimizations run off the request path (runner.py), one process each (worker.py)."""
