"""The command line: `tumorflow ...`, on top of every other layer."""
