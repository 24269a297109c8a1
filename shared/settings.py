"""The one settings object: every knob of the service, read from the environment and `.env`."""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Secrets shorter than these are refused at start: a guessable admin key or JWT salt would let
# anyone manage keys or forge callbacks. 32 bytes is RFC 7518's minimum for an HS256 key.
MIN_ADMIN_KEY_LENGTH = 16
MIN_SALT_LENGTH = 32


class Settings(BaseSettings):
    """Configuration. Names of the original service's variables are kept as they were."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=True)

    # --- the original's variables -------------------------------------------------
    ADMIN_API_KEY: SecretStr
    SALT: SecretStr
    PORT: int = Field(3852, ge=1, le=65535)
    HOST: str = "0.0.0.0"  # noqa: S104 - a server listens on every interface by default
    NODE_ENV: str = "dev"  # kept for compatibility; ENVIRONMENT is what this service reads
    APP_NAME: str = "Day2Day Email/Queue Server"
    APP_URL: str = ""
    MAX_UPLOAD_SIZE: int = Field(25, ge=1, le=100, description="MB per request")
    JWT_EXP_HRS: float = Field(3, gt=0, le=24 * 30)
    AWS_REGION: str = "us-east-1"
    AWS_ACCESS_KEY_ID: str = ""
    AWS_SECRET_ACCESS_KEY: SecretStr = SecretStr("")
    AWS_SES_SEND_LIMIT_PER_SEC: str = "10"  # a number, or "auto" to read MaxSendRate
    AWS_SES_QUEUE_WAIT_TIME: int = 1000  # ms; superseded by the shared token bucket
    AWS_CONFIG_SET_NAME: str = "email-status"
    MYSQL_HOST: str = "127.0.0.1"
    MYSQL_USER: str = "root"
    MYSQL_PASS: SecretStr = SecretStr("")
    MYSQL_PORT: int = 3306
    MYSQL_DB: str = "d2d_email_queue"

    # --- what the event-driven shape adds ---------------------------------------------
    ENVIRONMENT: Literal["dev", "production"] = "dev"
    RABBITMQ_URL: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    MYSQL_POOL_SIZE: int = Field(10, ge=1, le=200)
    EMAIL_TRANSPORT: Literal["outbox", "ses"] = "outbox"
    EMAIL_OUTBOX_DIR: str = "outbox"
    AWS_ENDPOINT_URL: str = ""
    LOG_FORMAT: Literal["json", "console"] = "console"
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The delay cascade: level n holds a message for DELAY_UNIT_MS * 2**n.
    DELAY_UNIT_MS: int = Field(1000, ge=1, le=60_000)
    DELAY_LEVELS: int = Field(28, ge=2, le=32)
    KEY_CACHE_SECONDS: float = Field(5.0, ge=0, le=300)
    SHUTDOWN_GRACE_SECONDS: float = Field(20.0, ge=0, le=600)
    CLIENT_MAX_JSON_BYTES: int = Field(1_048_576, ge=1024)
    RECONCILE_INTERVAL_SECONDS: float = Field(5.0, gt=0, le=3600)
    # Work not done this long after it was due is treated as lost and re-published.
    RECONCILE_GRACE_SECONDS: float = Field(10.0, ge=1, le=3600)

    # --- callbacks -----------------------------------------------------------------------

    # --- tasks ---------------------------------------------------------------------------

    # --- email ---------------------------------------------------------------------------

    # --- email tracking ------------------------------------------------------------------

    @field_validator("ADMIN_API_KEY")
    @classmethod
    def _strong_admin_key(cls, value: SecretStr) -> SecretStr:
        return _at_least(value, MIN_ADMIN_KEY_LENGTH)

    @field_validator("SALT")
    @classmethod
    def _strong_salt(cls, value: SecretStr) -> SecretStr:
        return _at_least(value, MIN_SALT_LENGTH)

    @cached_property
    def max_upload_bytes(self) -> int:
        return self.MAX_UPLOAD_SIZE * 1024 * 1024


def _at_least(value: SecretStr, length: int) -> SecretStr:
    secret = value.get_secret_value()
    if len(secret) < length or len(set(secret)) < 6:
        raise ValueError(f"must be at least {length} characters and not repetitive")
    return value
