"""Deployment formats: export.py runs every export (make, verify, time, register); base.py
holds the Exporter contract and the format registry; one file per format."""
