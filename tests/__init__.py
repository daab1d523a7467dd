"""Amulet Serve's test suite (a package, so that test modules in different folders may share a basename)."""
