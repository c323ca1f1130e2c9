"""TokenVerifier (which tokens are trusted, and why not) and extract_token (where they travel)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from starlette_dream_ws import SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX, AuthenticationFailed, Settings, User
from starlette_dream_ws.server.auth import TokenVerifier, extract_token

SECRET = "auth-test-secret-with-at-least-32-bytes!"
OTHER_SECRET = "another-secret-also-with-32-bytes-or-more"


@dataclass(frozen=True)
class KeyPair:
    private_pem: str
    public_pem: str


def _pems(private_key: Any) -> KeyPair:
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return KeyPair(private_pem, public_pem)


@pytest.fixture(scope="module")
def rsa_keys() -> KeyPair:
    return _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys() -> KeyPair:
    return _pems(ec.generate_private_key(ec.SECP256R1()))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims(**extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 3600}
    payload.update(extra)
    return {key: value for key, value in payload.items() if value is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def verifier(**settings: Any) -> TokenVerifier:
    settings.setdefault("jwt_secret", SECRET)
    return TokenVerifier(Settings(**settings))


# -- accepted tokens --------------------------------------------------------------------------


def test_valid_hs256_token_gives_the_user_from_sub() -> None:
    exp = int(time.time()) + 600
    user = verifier().verify(hs256(claims(exp=exp, role="admin")))
    assert isinstance(user, User)
    assert user.id == "alice"
    assert user.claims["role"] == "admin"
    assert user.expires_at == float(exp)


def test_custom_user_claim_is_the_user_id() -> None:
    user = verifier(jwt_user_claim="uid").verify(hs256(claims(sub="not-me", uid="bob")))
    assert user.id == "bob"


def test_int_custom_user_claim_becomes_a_string() -> None:
    user = verifier(jwt_user_claim="uid").verify(hs256(claims(uid=42)))
    assert user.id == "42"


def test_int_sub_is_accepted_as_a_string() -> None:
    assert verifier().verify(hs256(claims(sub=42))).id == "42"


def test_audience_and_issuer_are_checked_when_configured() -> None:
    v = verifier(jwt_audience="dream-ws", jwt_issuer="https://auth.example")
    user = v.verify(hs256(claims(aud="dream-ws", iss="https://auth.example")))
    assert user.id == "alice"


def test_exp_is_optional_when_not_required() -> None:
    assert verifier(jwt_require_exp=False).verify(hs256(claims(exp=None))).id == "alice"


def test_leeway_accepts_a_token_that_expired_moments_ago() -> None:
    token = hs256(claims(exp=int(time.time()) - 10))
    assert verifier(jwt_leeway=60).verify(token).id == "alice"


def test_rs256_token_verifies_with_the_public_key(rsa_keys: KeyPair) -> None:
    token = jwt.encode(claims(), rsa_keys.private_pem, algorithm="RS256")
    v = TokenVerifier(Settings(jwt_algorithms=("RS256",), jwt_public_key=rsa_keys.public_pem))
    assert v.verify(token).id == "alice"


def test_es256_token_verifies_with_the_public_key(ec_keys: KeyPair) -> None:
    token = jwt.encode(claims(), ec_keys.private_pem, algorithm="ES256")
    v = TokenVerifier(Settings(jwt_algorithms=("ES256",), jwt_public_key=ec_keys.public_pem))
    assert v.verify(token).id == "alice"


def test_several_public_key_algorithms_can_be_allowed_together(rsa_keys: KeyPair) -> None:
    token = jwt.encode(claims(), rsa_keys.private_pem, algorithm="RS256")
    v = TokenVerifier(Settings(jwt_algorithms=("ES256", "RS256"), jwt_public_key=rsa_keys.public_pem))
    assert v.verify(token).id == "alice"


# -- refused tokens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    settings: Callable[[KeyPair, KeyPair], dict[str, Any]]
    token: Callable[[KeyPair, KeyPair], str | None]
    reason: str


def hs(**extra: Any) -> Callable[[KeyPair, KeyPair], dict[str, Any]]:
    def settings(rsa_keys: KeyPair, ec_keys: KeyPair) -> dict[str, Any]:
        return {"jwt_secret": SECRET, **extra}

    return settings


def rs256_settings(rsa_keys: KeyPair, ec_keys: KeyPair) -> dict[str, Any]:
    return {"jwt_algorithms": ("RS256",), "jwt_public_key": rsa_keys.public_pem}


def es256_settings(rsa_keys: KeyPair, ec_keys: KeyPair) -> dict[str, Any]:
    return {"jwt_algorithms": ("ES256",), "jwt_public_key": ec_keys.public_pem}


def alg_none_token(rsa_keys: KeyPair, ec_keys: KeyPair) -> str:
    return f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(claims())}."


def key_confusion_token(rsa_keys: KeyPair, ec_keys: KeyPair) -> str:
    # HS256, with the server's RSA *public* key as the HMAC secret: PyJWT refuses to build
    # this, so it is signed by hand.
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT'})}.{b64json(claims())}"
    signature = hmac.new(rsa_keys.public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def es256_with_another_key(rsa_keys: KeyPair, ec_keys: KeyPair) -> str:
    return jwt.encode(claims(), _pems(ec.generate_private_key(ec.SECP256R1())).private_pem, algorithm="ES256")


def token(payload: dict[str, Any], secret: str = SECRET) -> Callable[[KeyPair, KeyPair], str]:
    return lambda rsa_keys, ec_keys: hs256(payload, secret)


REFUSALS: dict[str, Refusal] = {
    "no token": Refusal(hs(), lambda r, e: None, "missing_token"),
    "empty token": Refusal(hs(), lambda r, e: "", "missing_token"),
    "alg none": Refusal(hs(), alg_none_token, "algorithm_not_allowed"),
    "key confusion": Refusal(rs256_settings, key_confusion_token, "algorithm_not_allowed"),
    "rs256 token for an hs256 verifier": Refusal(
        hs(), lambda r, e: jwt.encode(claims(), r.private_pem, algorithm="RS256"), "algorithm_not_allowed"
    ),
    "another secret": Refusal(hs(), token(claims(), OTHER_SECRET), "bad_signature"),
    "es256 signed with another key": Refusal(es256_settings, es256_with_another_key, "bad_signature"),
    "wrong audience": Refusal(hs(jwt_audience="dream-ws"), token(claims(aud="billing")), "wrong_audience_or_issuer"),
    "missing audience": Refusal(hs(jwt_audience="dream-ws"), token(claims()), "missing_claim"),
    "wrong issuer": Refusal(
        hs(jwt_issuer="https://auth.example"), token(claims(iss="https://evil.example")), "wrong_audience_or_issuer"
    ),
    "missing issuer": Refusal(hs(jwt_issuer="https://auth.example"), token(claims()), "missing_claim"),
    "missing sub": Refusal(hs(), token(claims(sub=None)), "missing_claim"),
    "empty sub": Refusal(hs(), token(claims(sub="")), "missing_claim"),
    "missing custom user claim": Refusal(hs(jwt_user_claim="uid"), token(claims()), "missing_claim"),
    "missing exp": Refusal(hs(), token(claims(exp=None)), "missing_claim"),
    "expired": Refusal(hs(), token(claims(exp=int(time.time()) - 60)), "expired"),
    "nbf in the future": Refusal(hs(), token(claims(nbf=int(time.time()) + 600)), "not_yet_valid"),
    "garbage": Refusal(hs(), lambda r, e: "garbage!!token%%value", "invalid_token"),
    "three garbage segments": Refusal(hs(), lambda r, e: "abc.def.ghi", "invalid_token"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_with_a_reason_that_never_quotes_the_token(case: str, rsa_keys: KeyPair, ec_keys: KeyPair) -> None:
    refusal = REFUSALS[case]
    v = TokenVerifier(Settings(**refusal.settings(rsa_keys, ec_keys)))
    bad = refusal.token(rsa_keys, ec_keys)
    with pytest.raises(AuthenticationFailed) as caught:
        v.verify(bad)
    exc = caught.value
    assert exc.reason == refusal.reason
    assert exc.message and isinstance(exc.message, str)
    if bad:
        for text in (str(exc), exc.message, exc.reason, repr(exc)):
            assert bad not in text
            for segment in bad.split("."):
                if len(segment) > 3:
                    assert segment not in text
        # PyJWT's own exception (whose text may quote the token) is not chained for display.
        assert exc.__cause__ is None
        assert exc.__context__ is None or exc.__suppress_context__


def test_missing_claim_message_names_the_claim() -> None:
    with pytest.raises(AuthenticationFailed) as caught:
        verifier().verify(hs256(claims(exp=None)))
    assert "exp" in caught.value.message


# -- extract_token ----------------------------------------------------------------------------

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def test_token_from_the_query_string() -> None:
    assert extract_token({"token": JWT}, {}, []) == (JWT, None)


def test_no_token_anywhere() -> None:
    assert extract_token({}, {}, []) == (None, None)
    assert extract_token({"token": ""}, {}, []) == (None, None)


def test_token_from_the_authorization_header() -> None:
    assert extract_token({}, {"authorization": f"Bearer {JWT}"}, []) == (JWT, None)
    assert extract_token({}, {"authorization": f"bearer   {JWT}  "}, []) == (JWT, None)


def test_other_authorization_schemes_are_ignored() -> None:
    assert extract_token({}, {"authorization": "Basic dXNlcjpwYXNz"}, []) == (None, None)
    assert extract_token({"token": JWT}, {"authorization": "Bearer "}, []) == (JWT, None)


def test_token_from_the_subprotocol_accepts_v1_only_when_offered() -> None:
    offered = [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + JWT]
    assert extract_token({}, {}, offered) == (JWT, SUBPROTOCOL)
    assert TOKEN_SUBPROTOCOL_PREFIX == "dream-ws.bearer."
    assert SUBPROTOCOL == "dream-ws.v1"
    # Without dream-ws.v1 in the offer there is nothing to select (and the token is never echoed).
    assert extract_token({}, {}, [TOKEN_SUBPROTOCOL_PREFIX + JWT]) == (JWT, None)
    # dream-ws.v1 is selected whichever transport carries the token.
    assert extract_token({"token": JWT}, {}, [SUBPROTOCOL]) == (JWT, SUBPROTOCOL)


def test_subprotocol_wins_over_header_and_header_over_query() -> None:
    sub, header, query = JWT + "sub", JWT + "header", JWT + "query"
    everything = extract_token(
        {"token": query}, {"authorization": f"Bearer {header}"}, [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + sub]
    )
    assert everything == (sub, SUBPROTOCOL)
    assert extract_token({"token": query}, {"authorization": f"Bearer {header}"}, []) == (header, None)
    assert extract_token({"token": query}, {}, ["chat"]) == (query, None)
