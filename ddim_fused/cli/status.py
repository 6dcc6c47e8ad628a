"""The command line's exit statuses and program name (no imports: the entry point needs them first)."""

PROG = "ddim-fused"
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
