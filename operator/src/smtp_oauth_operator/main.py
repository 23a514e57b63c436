"""Entry point for ``kopf run -m smtp_oauth_operator.main``: importing it registers the handlers.

kopf runs the lifecycle (start-up, clean-up, signals), peering, the liveness probe and logging; the
watches that feed the reconciler are our own informers (clients/watching.py, services/feed.py),
started and paused by handlers/startup.py and handlers/peering.py.
"""

from smtp_oauth_operator.handlers import startup

__all__ = ["startup"]
