"""Worker runtime: fetch loop, executor, heartbeats, rescuer."""
