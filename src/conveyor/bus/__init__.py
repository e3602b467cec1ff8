"""The event bus: a port (``base.py``) with memory and Redis adapters."""
