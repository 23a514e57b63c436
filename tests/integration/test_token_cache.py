"""The token cache keeps an MSAL application (and the client secret inside it) only while a resource uses it.

Real peers: the local HTTPS Entra ID and Exchange; the connection test is the operator's own
(services/connection.py ``run``), reading the manifests through the ``check`` CLI's source.
"""

from __future__ import annotations

import asyncio
from typing import Any

import yaml

from smtp_oauth_operator.cli import ManifestSource
from smtp_oauth_operator.clients.identity import TokenProvider
from smtp_oauth_operator.domain.spec import parse_spec
from smtp_oauth_operator.services.connection import resolve, run, token_request

from .conftest import CLIENT, TENANT, Peers

ROTATED = "ROTATED~n3w.VALUE_fedcba9876543210"


async def _test(peers: Peers, tokens: TokenProvider, name: str, secret: str) -> Any:
    """One connection test of ``mail/<name>`` whose Secret holds ``secret``; returns its token request."""
    peers.secret = secret
    source = ManifestSource(yaml.safe_load_all(peers.manifests(name=name).read_text()))
    spec = parse_spec(peers.spec())
    inputs = await resolve(spec, "mail", 1, source)
    result = await run(spec, inputs, tokens, where=f"mail/{name}")
    assert result.failure is None, result.failure
    return token_request(spec, inputs)


def test_a_rotated_secret_leaves_the_cache_with_its_application(peers: Peers) -> None:
    async def scenario() -> None:
        tokens = TokenProvider()
        old = await _test(peers, tokens, "a", peers.secret)
        assert old in tokens
        assert peers.idp.token_requests_for(CLIENT) == 1

        # The admin rotates the client secret (Entra accepts both during the overlap) and updates the Secret.
        peers.idp.add_secret(TENANT, CLIENT, ROTATED)
        new = await _test(peers, tokens, "a", ROTATED)
        assert new in tokens
        assert old not in tokens, "the application holding the rotated-out secret was kept"
        assert len(tokens) == 1

    asyncio.run(scenario())


def test_an_application_lives_while_any_resource_uses_it(peers: Peers) -> None:
    async def scenario() -> None:
        tokens = TokenProvider()
        request = await _test(peers, tokens, "a", peers.secret)
        await _test(peers, tokens, "b", peers.secret)
        assert peers.idp.token_requests_for(CLIENT) == 1  # shared: one token for both
        assert len(tokens) == 1

        tokens.release("mail/a")  # deleted
        assert request in tokens, "still used by mail/b"
        tokens.retain(["mail/c"])  # a re-list that no longer returns mail/b
        assert request not in tokens
        assert len(tokens) == 0

        # A resource seen again later simply gets a fresh application (and token).
        await _test(peers, tokens, "b", peers.secret)
        assert request in tokens
        assert peers.idp.token_requests_for(CLIENT) == 2
        tokens.clear()
        assert len(tokens) == 0

    asyncio.run(scenario())
