"""Validation and calibration data: sources, binding to a model's signature, metrics, the gate."""
