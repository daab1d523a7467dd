"""``amulet-eval``: run a question set through the methods, score the answers, compare, report."""
