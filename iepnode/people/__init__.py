"""people: see docs/architecture.md."""
