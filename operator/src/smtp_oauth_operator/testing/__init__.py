"""Real local servers for tests, the demo and the benchmark: nothing here is a mock.

Why: the project does not mock msal or aiosmtplib, so their counterparts must exist for real on
127.0.0.1 and answer the way the cloud services do (see ``docs``/protocol facts):

* :mod:`.pki` — a throw-away CA issuing server certificates (trusted and untrusted CAs).
* :mod:`.idp` — ``FakeEntraID``, HTTPS OIDC discovery + client-credentials token endpoint with
  Entra ID's error JSON and injectable throttling, 5xx and hangs.
* :mod:`.graph` — ``FakeGraph``, Microsoft Graph's application credential API (read, addPassword,
  removePassword) over ``FakeEntraID``'s directory, with Graph's error JSON, throttling and denial.
* :mod:`.smtpd` — ``FakeExchange``, an aiosmtpd server replying like smtp.office365.com.
* :mod:`.peers` — silent/garbage/closed peers and an HTTP CONNECT proxy.
* :mod:`.devservers` and ``python -m smtp_oauth_operator.testing serve`` — all of it at once.

Nothing is imported here on purpose: aiosmtpd is an optional extra (``testing``) needed only by
:mod:`.smtpd` and :mod:`.devservers`, so ``pki``, ``idp`` and ``peers`` work without it.
"""

__all__: list[str] = []
