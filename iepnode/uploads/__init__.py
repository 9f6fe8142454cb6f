"""uploads: see docs/architecture.md."""
