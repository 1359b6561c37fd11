"""`python -m sdkit` is the same as the `sdkit` command."""

from sdkit.cli.main import main

main()
