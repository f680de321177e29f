"""The optimizer: candidates -> gate -> benchmark -> choose -> report."""
