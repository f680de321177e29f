"""The command line: a thin face over optiserve.api. It owns the terminal (Rich)."""
