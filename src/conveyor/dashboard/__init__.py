"""The web dashboard served at ``/`` by ``conveyor up`` and ``conveyor api``."""

from conveyor.dashboard.router import NAV, add_nav, dashboard_router

__all__ = ["NAV", "add_nav", "dashboard_router"]
