"""A local OIDC token issuer, as a Kubernetes cluster's service-account issuer looks from outside.

Why: workload identity federation makes Entra ID fetch the issuer's discovery document and keys
(``{issuer}/.well-known/openid-configuration`` → ``jwks_uri``) and verify the ServiceAccount token
presented as the client assertion. The e2e suite uses the real kube-apiserver for that; tests without
a cluster (the ``check`` CLI's integration tests) use this HTTPS server on 127.0.0.1, which serves the
same two documents and mints RS256 tokens shaped like the API server's TokenRequest tokens.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from smtp_oauth_operator.testing.pki import CertificateAuthority, ServerCert

__all__ = ["OidcIssuer"]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """No access log on stderr."""

    def do_GET(self) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(self.path)
            down = owner.down
        if down:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/.well-known/openid-configuration":
            body: dict[str, Any] = {
                "issuer": owner.issuer,
                "jwks_uri": f"{owner.issuer}/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        elif self.path == "/openid/v1/jwks":
            body = {"keys": [owner.jwk()]}
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: OidcIssuer


class OidcIssuer:
    """``with OidcIssuer(cert) as issuer: token = issuer.mint("system:serviceaccount:mail:sender")``."""

    def __init__(self, cert: ServerCert | None = None, *, host: str = "127.0.0.1") -> None:
        self.cert = cert or CertificateAuthority.create("OIDC issuer CA").issue(host, "localhost")
        self.host = host
        self.key = rsa.generate_private_key(65537, 2048)
        self.kid = uuid.uuid4().hex
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.minted: list[str] = []  # leak canaries: none may appear in any output
        self.down = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OidcIssuer:
        server = _Server((self.host, 0), _Handler)
        server.owner = self
        server.socket = self.cert.server_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OidcIssuer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def issuer(self) -> str:
        assert self._server is not None
        return f"https://{self.host}:{self._server.server_address[1]}"

    @property
    def ca_pem(self) -> str:
        return self.cert.ca_pem

    def jwk(self) -> dict[str, Any]:
        key: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        key.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return key

    def mint(
        self,
        subject: str,
        audience: str = "api://AzureADTokenExchange",
        *,
        lifetime: int = 3600,
        not_before: float | None = None,
        issuer: str | None = None,
    ) -> str:
        """A token like the API server's TokenRequest answer (claims iss, sub, aud, exp, iat, nbf)."""
        now = time.time() if not_before is None else not_before
        namespace, _, name = subject.removeprefix("system:serviceaccount:").partition(":")
        claims = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": [audience],
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now) + lifetime,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
            },
        }
        token = jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})
        with self.lock:
            self.minted.append(token)
        return token
