"""The operator's benchmark (issue 7): ``python -m e2e.bench [--ci] [--out DIR]``; see docs/performance.md."""
