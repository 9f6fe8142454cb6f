"""viewing: see docs/architecture.md."""
