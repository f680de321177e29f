"""HTTP faces of the server: management.py (/api/v1), errors.py (one error shape)."""
