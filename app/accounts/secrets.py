"""Account secrets at rest: Mosaic API keys encrypted with Fernet, webhook secrets hashed."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class Keyring:
    """Fernet keys in rotation order: the first encrypts, any of them decrypts."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("UNBLOCK_ENCRYPTION_KEY holds no key")
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except ValueError as exc:
            raise ValueError(
                "UNBLOCK_ENCRYPTION_KEY must be Fernet keys (urlsafe base64 of 32 bytes), "
                "comma-separated"
            ) from exc

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise ValueError(
                "stored Mosaic key cannot be decrypted with the configured keys"
            ) from exc

    def rotate(self, token: str) -> str:
        """Re-encrypt under the newest key."""
        return self._fernet.rotate(token.encode()).decode()


def generate_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def hash_webhook_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def webhook_secret_matches(presented: str | None, stored_hash: str) -> bool:
    """Constant-time comparison of the presented X-Mosaic-Signature with the stored hash."""
    if not presented:
        return False
    return hmac.compare_digest(hash_webhook_secret(presented), stored_hash)
