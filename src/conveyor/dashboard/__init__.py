"""The web dashboard served at ``/`` by ``conveyor up`` and ``conveyor api``."""

from conveyor.dashboard.router import DEFAULT_NAV, NavItem, dashboard_router

__all__ = ["DEFAULT_NAV", "NavItem", "dashboard_router"]
