"""`python -m convtool` runs the CLI."""

from convtool.cli import main

main()
