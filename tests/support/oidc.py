"""An OIDC identity provider on 127.0.0.1 for the tests: discovery document and JWKS of real RSA and EC key pairs (which can rotate), and tokens signed with them."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

AUDIENCE = "aex-api"


class Issuer:
    """An identity provider on 127.0.0.1: discovery document and JWKS (keys can rotate)."""

    def __init__(self):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.published = {"rsa-1": self.rsa.public_key(), "ec-1": self.ec.public_key()}
        self.jwks_hits = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_hits += 1
                    body = {"keys": [issuer.jwk(kid, key) for kid, key in issuer.published.items()]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def jwk(kid, public_key) -> dict:
        algo = jwt.algorithms.RSAAlgorithm if isinstance(public_key, rsa.RSAPublicKey) else jwt.algorithms.ECAlgorithm
        return {**algo.to_jwk(public_key, as_dict=True), "kid": kid, "use": "sig"}

    def claims(self, **over) -> dict:
        now = int(time.time())
        base = {"iss": self.url, "aud": AUDIENCE, "sub": "user-17", "iat": now, "exp": now + 300}
        base.update({"scope": "openid read submit", "tenant": "ward-7"})
        return {k: v for k, v in {**base, **over}.items() if v is not None}

    def token(self, key=None, alg="RS256", kid="rsa-1", **claims) -> str:
        return jwt.encode(self.claims(**claims), key or self.rsa, algorithm=alg, headers={"kid": kid})

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
