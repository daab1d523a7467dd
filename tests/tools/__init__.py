"""Scripts that maintain test fixtures and README material (run with ``python -m tests.tools.<name>``)."""
