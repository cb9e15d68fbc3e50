"""The command-line entry points (jobs/<job>.py), a package so tests can run them in-process."""
