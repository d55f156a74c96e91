"""The floor everything stands on: typed config (the one source of defaults), errors and exit
codes, atomic file writes and hashing, the one key=value command-line convention. No torch."""
