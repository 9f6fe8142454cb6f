"""sharing: see docs/architecture.md."""
