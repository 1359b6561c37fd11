"""The `sdkit` command line: thin click commands, one library call each."""
