"""`python -m optiserve` runs the CLI."""

from optiserve.cli.main import main

main()
