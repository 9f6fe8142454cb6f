"""outbound: see docs/architecture.md."""
