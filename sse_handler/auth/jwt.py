"""JWTs as stream credentials: :class:`JWTVerifier` turns a token into a Grant.

Needs PyJWT (``pip install 'sse_handler[jwt]'``; ``cryptography`` too for
RS256/ES256), imported when a verifier is created, so that the rest of the
package imports without it.

A token is verified (signature, ``exp``, ``nbf``, ``iat``, and ``aud`` /
``iss`` when configured, with ``leeway`` seconds of clock skew) and read as a
:class:`~sse_handler.grant.Grant`: ``sub`` the subject, the ``channels`` claim
the channels it may read and the ``publish`` claim those it may publish to
(lists of patterns, ``*`` matching any run of characters, as Mercure's topic
selectors), ``exp`` (plus the leeway) the moment its streams end.

Keys: a secret (HS256) or a public key (RS256, ES256: PEM, or a key object of
``cryptography``), or a JWKS URL read through PyJWT's ``PyJWKClient`` (cached;
fetched in a thread, never on the event loop). A verifier takes HMAC or
public-key algorithms, never both: with both, a public key could be used as an
HMAC secret (algorithm confusion).
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import SSEHandlerError
from ..grant import Grant

__all__ = ["InvalidToken", "JWTVerifier", "TokenKeysUnavailable"]

_HMAC = frozenset({"HS256", "HS384", "HS512"})
_PUBLIC_KEY = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class InvalidToken(SSEHandlerError):
    """The token is malformed, forged, expired, or lacks a required claim (401)."""


class TokenKeysUnavailable(SSEHandlerError):
    """The JWKS URL could not be read: the server cannot verify any token now (503)."""


def _pyjwt() -> Any:
    try:
        import jwt
    except ImportError:
        raise ImportError(
            "sse_handler.auth.JWTVerifier needs PyJWT: pip install 'sse_handler[jwt]'"
        ) from None
    return jwt


class JWTVerifier:
    """Verifies JWTs and reads them as :class:`~sse_handler.grant.Grant` values.

    ``JWTVerifier(key="secret")`` (HS256), ``JWTVerifier(key=pem, algorithms=["RS256"])``,
    ``JWTVerifier(jwks_url="https://issuer/.well-known/jwks.json", algorithms=["ES256"],
    audience="events", issuer="https://issuer/")``.

    ``channels_claim`` (default ``channels``) is required: a token without it
    is invalid. ``publish_claim`` (default ``publish``) is optional; without it
    the token may publish nowhere. ``required`` lists further claims a token
    must carry (default ``exp`` and ``sub``). An HMAC key shorter than 32
    bytes is refused unless ``weak_key`` is true.
    """

    def __init__(
        self,
        *,
        key: Any = None,
        jwks_url: str | None = None,
        algorithms: Sequence[str] = ("HS256",),
        audience: str | Sequence[str] | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        channels_claim: str = "channels",
        publish_claim: str = "publish",
        required: Sequence[str] = ("exp", "sub"),
        weak_key: bool = False,
    ) -> None:
        self._jwt = _pyjwt()
        if (key is None) == (jwks_url is None):
            raise ValueError("give a key or a jwks_url (one of them)")
        if isinstance(algorithms, str):
            raise TypeError("algorithms must be a collection of names, e.g. ['RS256']")
        unknown = set(algorithms) - _HMAC - _PUBLIC_KEY
        if unknown or not algorithms:
            raise ValueError(f"algorithms must be among {sorted(_HMAC | _PUBLIC_KEY)}")
        if set(algorithms) & _HMAC and set(algorithms) & _PUBLIC_KEY:
            raise ValueError("mixing HMAC and public-key algorithms allows algorithm confusion")
        if jwks_url is not None and set(algorithms) & _HMAC:
            raise ValueError("a JWKS holds public keys: give public-key algorithms (RS256, ES256)")
        if set(algorithms) & _HMAC and len(_key_bytes(key)) < 32 and not weak_key:
            raise ValueError(
                "an HMAC key must be at least 32 bytes long (RFC 7518, section 3.2); "
                "weak_key=True accepts a shorter one (tests, demos)"
            )
        self.weak_key = weak_key
        if leeway < 0:
            raise ValueError("leeway must not be negative")
        self.key = key
        self.algorithms = list(algorithms)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.channels_claim = channels_claim
        self.publish_claim = publish_claim
        self.required = list(required)
        #: PyJWT's ``PyJWKClient`` for ``jwks_url`` (None with a key).
        self.jwks = None if jwks_url is None else self._jwt.PyJWKClient(jwks_url, timeout=5)

    async def verify(self, token: str) -> Grant:
        """The grant ``token`` carries; :class:`InvalidToken` if it carries none."""
        jwt = self._jwt
        key = self.key
        try:
            if self.jwks is not None:
                key = await asyncio.to_thread(self.jwks.get_signing_key_from_jwt, token)
            with warnings.catch_warnings():
                if self.weak_key:
                    # Chosen knowingly: PyJWT's warning would repeat per token.
                    warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=self.algorithms,
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options={"require": self.required},
                )
        except jwt.PyJWKClientConnectionError as exc:
            raise TokenKeysUnavailable(str(exc)) from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            # PyJWKClientError (no key for the token's kid) is a PyJWTError too.
            raise InvalidToken(str(exc) or type(exc).__name__) from None
        return self.grant(claims)

    def grant(self, claims: dict[str, Any]) -> Grant:
        """Verified ``claims`` as a grant; :class:`InvalidToken` for a claim of the wrong shape."""
        if self.channels_claim not in claims:
            raise InvalidToken(f"the token has no {self.channels_claim!r} claim")
        read = _patterns(claims, self.channels_claim)
        publish = _patterns(claims, self.publish_claim)
        subject = claims.get("sub")
        if subject is not None and not isinstance(subject, str):
            raise InvalidToken("'sub' must be a string")
        exp = claims.get("exp")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
            raise InvalidToken("'exp' must be a number")
        expires_at = None if exp is None else float(exp) + self.leeway
        return Grant(read, subject=subject, publish=publish, expires_at=expires_at)


def _key_bytes(key: Any) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes):
        return key
    raise TypeError("an HMAC key must be str or bytes")


def _patterns(claims: dict[str, Any], name: str) -> list[str]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidToken(f"the {name!r} claim must be a list of strings")
    return value
