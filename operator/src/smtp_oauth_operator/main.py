"""Entry point for ``kopf run -m smtp_oauth_operator.main``: importing it registers the handlers."""

from smtp_oauth_operator.handlers import resources, startup

__all__ = ["resources", "startup"]
