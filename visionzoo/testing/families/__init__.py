"""Per-family parity hooks (see visionzoo.testing.parity): ``run_case`` and ``check_manifest_entry``."""
