"""Settings, errors, types and optional-dependency helpers. Imports nothing above it."""
