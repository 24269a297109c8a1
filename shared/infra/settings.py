"""The one settings object: every knob of the service, read from the environment and `.env`."""

from __future__ import annotations

from functools import cached_property
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.infra.crypto import Keyring

# Secrets shorter than these are refused at start: a guessable admin key or SALT would let anyone
# manage keys or derive the keys that seal secrets and sign pixels (32 bytes is also RFC 7518's
# minimum for an HS256 key, which SALT is under CALLBACK_JWT_KEY=salt).
MIN_ADMIN_KEY_LENGTH = 16
MIN_SALT_LENGTH = 32
# RabbitMQ (3.10.2+, `rabbit_misc:check_expiry`) refuses any TTL above 10 years.
MAX_TTL_MS = 315_360_000_000


class Settings(BaseSettings):
    """Configuration. Names of the original service's variables are kept as they were."""

    # hide_input_in_errors: a refused value can be a secret (RABBITMQ_URL carries a password).
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", case_sensitive=True, hide_input_in_errors=True
    )

    # --- the original's variables -------------------------------------------------
    ADMIN_API_KEY: SecretStr
    SALT: SecretStr
    PORT: int = Field(3852, ge=1, le=65535)
    HOST: str = "0.0.0.0"  # noqa: S104 - a server listens on every interface by default
    # The original's meaning: "dev", or "production" (blank also means production).
    NODE_ENV: Literal["dev", "production", ""] = "dev"
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
    # One URL, or one per node of a cluster, comma-separated (same vhost and credentials).
    RABBITMQ_URL: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    # One connection attempt to one node (TCP, AMQP handshake, first channel), at most.
    RABBITMQ_CONNECT_TIMEOUT_SECONDS: float = Field(5.0, gt=0, le=120)
    # A process whose connection, channels and consumers have not all been open this long
    # throws them away and connects again, whatever state they are in.
    RABBITMQ_WATCHDOG_SECONDS: float = Field(20.0, ge=2, le=3600)
    # Replicas of each quorum queue when it is first declared (RabbitMQ caps it at the
    # cluster's size); existing queues keep theirs (README "Running on a cluster").
    RABBITMQ_QUORUM_INITIAL_GROUP_SIZE: int = Field(3, ge=1, le=99)
    MYSQL_POOL_SIZE: int = Field(10, ge=1, le=200)
    # "auto": SES when AWS credentials are configured (these settings or the standard AWS
    # chain), the outbox otherwise; shared/email/transports.py:choose_transport decides.
    EMAIL_TRANSPORT: Literal["auto", "outbox", "ses"] = "auto"
    EMAIL_OUTBOX_DIR: str = "outbox"
    AWS_ENDPOINT_URL: str = ""
    LOG_FORMAT: Literal["json", "console", ""] = ""  # blank: json in production, else console
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "original": every error but 401 is answered HTTP 200 with the same {valid: false, msg,
    # code} body, as the original service did (gateway/middleware.py); "http": real statuses.
    ERROR_STATUS: Literal["http", "original"] = "http"
    # The delay cascade: level n holds a message for DELAY_UNIT_MS * 2**n.
    DELAY_UNIT_MS: int = Field(1000, ge=1, le=60_000)
    DELAY_LEVELS: int = Field(28, ge=2, le=32)
    KEY_CACHE_SECONDS: float = Field(5.0, ge=0, le=300)
    # Requests per second per client key (all gateways together) unless the key has its own
    # `rate_limit_per_sec`; 0 or blank: unlimited.
    API_RATE_LIMIT_PER_SEC: int = Field(0, ge=0, le=1_000_000)
    SHUTDOWN_GRACE_SECONDS: float = Field(20.0, ge=0, le=600)
    CLIENT_MAX_JSON_BYTES: int = Field(1_048_576, ge=1024)
    # Slow clients (slowloris): a connection that has not sent a request's headers this long
    # after it opened (or after the previous response) is closed; also how long an idle
    # keep-alive connection stays open.
    HTTP_KEEPALIVE_SECONDS: float = Field(75.0, gt=0, le=3600)
    # A request body must arrive in full within this long after its headers: a slower one is
    # answered 408 and its connection closed. Raise it for big uploads over slow links.
    HTTP_BODY_TIMEOUT_SECONDS: float = Field(60.0, gt=0, le=3600)
    RECONCILE_INTERVAL_SECONDS: float = Field(5.0, gt=0, le=3600)
    # Work not done this long after it was due is treated as lost and re-published.
    RECONCILE_GRACE_SECONDS: float = Field(10.0, ge=1, le=3600)
    # Tasks are swept more often, and fired once this late: a timer still in the cascade
    # then (an expiry storm queues in the broker's dead-lettering) is overtaken by MySQL.
    TASK_SWEEP_INTERVAL_SECONDS: float = Field(1.0, gt=0, le=3600)
    TASK_SWEEP_GRACE_SECONDS: float = Field(2.0, ge=0.5, le=3600)
    # How often each gateway refreshes the fleet gauges (rows by status, queue depths).
    STATUS_REFRESH_SECONDS: float = Field(15.0, ge=1, le=3600)
    # Where a `queue-server worker` process serves /metrics, /healthz and /readyz (0: nowhere;
    # the gateway serves them on PORT). Under `queue-server run` every child gets its own port
    # from this one up (README "Operations").
    METRICS_PORT: int = Field(3853, ge=0, le=65535)
    # At start, how long to wait for MySQL and RabbitMQ while they are unreachable (containers
    # start in any order); wrong credentials or a missing vhost/database fail at once.
    STARTUP_WAIT_SECONDS: float = Field(60.0, ge=0, le=3600)

    # --- the console (/console, README "Console") -------------------------------------------
    # A console sign-in lasts this long (then the key is asked for again).
    CONSOLE_SESSION_HOURS: float = Field(12.0, gt=0, le=24 * 30)
    # Failed console sign-ins one client address may make per minute (per gateway process);
    # further attempts within the minute are refused (429) without checking the key.
    CONSOLE_LOGIN_FAILURES_PER_MINUTE: int = Field(5, ge=1, le=10_000)

    # --- keys and secrets (README "Callbacks" and "Operations") ---------------------------
    # The SALT before the current one, while rotating SALT: webhook secrets sealed under it
    # still open (and are re-sealed under SALT at start), pixels it signed still count.
    SALT_PREVIOUS: SecretStr = SecretStr("")
    # What signs the callback JWT: "secret" (each key's own webhook secret, `sub` = the key's
    # id) or "salt" (SALT itself, `sub` = the key's name: the old scheme, weaker, for clients
    # that still verify with SALT).
    CALLBACK_JWT_KEY: Literal["secret", "salt"] = "secret"
    # After POST /server/api/rotate-secret, callbacks are signed under the old secret too for
    # this long (Standard Webhooks signatures; the JWT uses the new one).
    WEBHOOK_SECRET_OVERLAP_HOURS: float = Field(24, ge=0, le=24 * 30)
    # Open pixels of emails sent before the per-purpose keys (SHA-256 of SALT tags) count for
    # this many days after the upgrade; 0: not at all.
    PIXEL_LEGACY_TAG_DAYS: float = Field(30, ge=0, le=3650)

    # --- callbacks -----------------------------------------------------------------------
    # Seconds to wait before each delivery attempt, comma-separated; the first is the first
    # attempt (0: at once). When the last attempt fails, the delivery is FAILED.
    CALLBACK_RETRY_SCHEDULE: Annotated[tuple[float, ...], NoDecode] = (
        0, 5, 300, 1800, 7200, 18000, 36000, 36000
    )  # fmt: skip
    CALLBACK_TIMEOUT_SECONDS: float = Field(10.0, gt=0, le=300)
    # Deliveries in flight per worker process (the consumer's prefetch).
    CALLBACK_CONCURRENCY: int = Field(64, ge=1, le=5000)
    # Of those, at most this many for one key, so one slow receiver cannot take every slot.
    CALLBACK_PER_KEY_CONCURRENCY: int = Field(16, ge=1, le=5000)
    # A delivery over its key's limit waits for a free slot while the key's oldest POST in
    # flight is younger than this; past it (a slow or hung receiver) it is deferred at once.
    CALLBACK_PER_KEY_PATIENCE_MS: float = Field(500.0, ge=0, le=60_000)
    # A 429/503 `Retry-After` is honoured up to this many seconds.
    CALLBACK_RETRY_AFTER_MAX_SECONDS: float = Field(3600.0, ge=0, le=86_400)
    # Destination networks (CIDRs, comma-separated) checked on the address actually connected
    # to. Empty allow list = anywhere not denied. Private ranges are allowed unless denied here.
    # Link-local, metadata (169.254.169.254, fd00:ec2::254, 100.100.100.200), NAT64 and, in
    # production, loopback are refused unless an allow entry inside them lists them.
    CALLBACK_ALLOW_NETWORKS: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = ()
    CALLBACK_DENY_NETWORKS: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = ()

    # --- tasks ---------------------------------------------------------------------------
    # Largest `data` object of one task, counted as compact UTF-8 JSON.
    TASK_MAX_DATA_BYTES: int = Field(65_536, ge=2, le=1_048_576)
    # Timer messages one expiry worker holds at once; a high value lets an expiry storm flow.
    EXPIRY_PREFETCH: int = Field(5_000, ge=1, le=65_535)
    # The expiry worker expires due tasks in batches of up to this many per transaction
    # (batches form by themselves while earlier ones commit)...
    EXPIRY_BATCH_SIZE: int = Field(500, ge=1, le=10_000)
    # ...optionally waiting this long for more once the first one is ready (adds latency).
    EXPIRY_BATCH_WAIT_MS: float = Field(0.0, ge=0, le=1_000)

    # --- email ---------------------------------------------------------------------------
    # SendEmail commands one email worker holds per queue (transactional and promotional).
    EMAIL_PREFETCH: int = Field(64, ge=1, le=1000)
    # Transient send failures (timeouts, 5xx) before an email is ERROR; throttling never counts.
    EMAIL_MAX_ATTEMPTS: int = Field(6, ge=1, le=50)
    EMAIL_RETRY_BASE_MS: float = Field(2000, ge=100, le=600_000)
    # How long a worker's claim on an email lasts; a claim older than this (worker died
    # mid-send) may be taken over, which is the one place an email can go out twice.
    EMAIL_LEASE_SECONDS: float = Field(90, ge=10, le=3600)
    # Send slots are spaced (1 s + margin) / rate apart; a request not on the wire within
    # margin/3 of its slot is not made, and the rest covers the trip to SES. So no
    # one-second window ever holds more than the rate (see shared/email/ratelimit.py). Costs
    # margin/(1 s + margin) of the rate; raise it where the network to SES is jittery.
    EMAIL_RATE_MARGIN_MS: float = Field(15, ge=1, le=1000)
    # Promotional mail books send slots at most this far ahead, transactional mail up to
    # EMAIL_SLOT_MAX_WAIT_SECONDS: a transactional email waits behind at most this much.
    EMAIL_PROMOTIONAL_HORIZON_MS: float = Field(250, ge=10, le=60_000)
    # A worker waiting longer than this for a slot hands the email back for a later retry.
    EMAIL_SLOT_MAX_WAIT_SECONDS: float = Field(10, ge=1, le=600)
    # After SES throttling the fleet's rate is halved; it doubles again every cooldown.
    EMAIL_THROTTLE_COOLDOWN_SECONDS: float = Field(30, ge=1, le=3600)
    # "Daily message quota exceeded": the whole fleet pauses sending this long.
    EMAIL_QUOTA_PAUSE_SECONDS: float = Field(600, ge=1, le=86_400)
    # AWS_SES_SEND_LIMIT_PER_SEC=auto: how often each worker re-reads MaxSendRate (>= 1 s).
    EMAIL_QUOTA_REFRESH_SECONDS: float = Field(300, ge=1, le=86_400)
    # A QUEUED email whose command was confirmed but not handled for this long is re-published
    # (covers a message lost by the broker; duplicates are harmless).
    EMAIL_STALE_QUEUED_SECONDS: float = Field(3600, ge=10, le=7 * 86_400)
    SES_CONNECT_TIMEOUT_SECONDS: float = Field(5, gt=0, le=120)
    SES_READ_TIMEOUT_SECONDS: float = Field(30, gt=0, le=600)

    @field_validator("AWS_SES_SEND_LIMIT_PER_SEC")
    @classmethod
    def _send_limit(cls, value: str) -> str:
        value = value.strip().lower()
        if value == "auto":
            return value
        try:
            rate = float(value)
        except ValueError:
            rate = -1
        if not 0 < rate <= 1_000_000:
            raise ValueError('must be a number of emails per second (> 0) or "auto"')
        return value

    @property
    def ses_send_limit(self) -> float | None:
        """The configured send rate per second, or None for `auto` (SES MaxSendRate)."""
        value = self.AWS_SES_SEND_LIMIT_PER_SEC
        return None if value == "auto" else float(value)

    # --- email tracking ------------------------------------------------------------------
    # Comma-separated SNS topic ARNs whose messages are accepted (empty: none are).
    SNS_TOPIC_ARNS: str = ""
    SNS_MAX_AGE_SECONDS: int = Field(3600, ge=60, le=86_400)
    SNS_MAX_BODY_BYTES: int = Field(256 * 1024, ge=1024, le=10 * 1024 * 1024)

    @field_validator("CALLBACK_RETRY_SCHEDULE", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> Any:
        delays = [float(x) for x in _comma_separated(value)]
        if not 1 <= len(delays) <= 50 or delays[0] != 0:
            raise ValueError("give 1 to 50 delays in seconds, the first one 0")
        if any(not 0 <= d <= 7 * 86_400 for d in delays):
            raise ValueError("each delay must be between 0 and 604800 seconds")
        return tuple(delays)

    @field_validator("CALLBACK_ALLOW_NETWORKS", "CALLBACK_DENY_NETWORKS", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        return tuple(ip_network(x, strict=False) for x in _comma_separated(value))

    @field_validator("RABBITMQ_URL")
    @classmethod
    def _broker_nodes(cls, value: SecretStr) -> SecretStr:
        broker_nodes(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _watchdog_outlasts_an_attempt(self) -> Self:
        if self.RABBITMQ_WATCHDOG_SECONDS <= self.RABBITMQ_CONNECT_TIMEOUT_SECONDS:
            # The watchdog would cut every attempt short and never let one finish.
            raise ValueError(
                "RABBITMQ_WATCHDOG_SECONDS must be longer than RABBITMQ_CONNECT_TIMEOUT_SECONDS"
            )
        return self

    @model_validator(mode="after")
    def _cascade_fits_the_broker(self) -> Self:
        top_ms = self.DELAY_UNIT_MS * 2 ** (self.DELAY_LEVELS - 1)
        if top_ms > MAX_TTL_MS:
            # RabbitMQ would refuse to declare the top delay level (a TTL over 10 years).
            fits = max(n for n in range(1, 33) if self.DELAY_UNIT_MS * 2 ** (n - 1) <= MAX_TTL_MS)
            raise ValueError(
                f"DELAY_LEVELS={self.DELAY_LEVELS} with DELAY_UNIT_MS={self.DELAY_UNIT_MS} makes "
                f"the top delay level hold messages {top_ms} ms, over RabbitMQ's limit of "
                f"{MAX_TTL_MS} ms (10 years): set DELAY_LEVELS to {fits} or less"
            )
        return self

    @property
    def rabbitmq_urls(self) -> tuple[str, ...]:
        """Every node's URL, in the order given (they carry the credentials: never log them)."""
        return broker_nodes(self.RABBITMQ_URL.get_secret_value())

    @field_validator("ADMIN_API_KEY")
    @classmethod
    def _strong_admin_key(cls, value: SecretStr) -> SecretStr:
        return _at_least(value, MIN_ADMIN_KEY_LENGTH)

    @field_validator("SALT")
    @classmethod
    def _strong_salt(cls, value: SecretStr) -> SecretStr:
        return _at_least(value, MIN_SALT_LENGTH)

    @field_validator("SALT_PREVIOUS")
    @classmethod
    def _strong_previous_salt(cls, value: SecretStr) -> SecretStr:
        return _at_least(value, MIN_SALT_LENGTH) if value.get_secret_value() else value

    @field_validator("API_RATE_LIMIT_PER_SEC", mode="before")
    @classmethod
    def _blank_is_unlimited(cls, value: Any) -> Any:
        return 0 if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _previous_salt_differs(self) -> Self:
        if self.SALT_PREVIOUS.get_secret_value() == self.SALT.get_secret_value():
            raise ValueError("SALT_PREVIOUS must differ from SALT (blank when not rotating)")
        return self

    @property
    def keyring(self) -> Keyring:
        """The keys derived from SALT (and SALT_PREVIOUS), one per purpose (derived once)."""
        return Keyring.of(self.SALT.get_secret_value(), self.SALT_PREVIOUS.get_secret_value())

    @property
    def is_production(self) -> bool:
        return self.NODE_ENV != "dev"

    @property
    def log_format(self) -> str:
        return self.LOG_FORMAT or ("json" if self.is_production else "console")

    @property
    def sns_topics(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.SNS_TOPIC_ARNS.split(",") if t.strip())

    @cached_property
    def max_upload_bytes(self) -> int:
        return self.MAX_UPLOAD_SIZE * 1024 * 1024


def broker_nodes(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated RABBITMQ_URL; ValueError (without the secrets) unless each
    is an AMQP URL with a host, and all name the same vhost and credentials."""
    urls = tuple(_comma_separated(value))
    if not urls:
        raise ValueError("give at least one amqp:// or amqps:// URL")
    parts = [urlsplit(url) for url in urls]
    for n, part in enumerate(parts, 1):
        if part.scheme not in ("amqp", "amqps") or not part.hostname:
            raise ValueError(f"URL {n} is not an amqp:// or amqps:// URL with a host")
        part.port  # noqa: B018 - raises ValueError on a port that is not a number
    if len({(p.scheme, p.username, p.password, p.path) for p in parts}) > 1:
        # Every node must be a node of the same broker to this service.
        raise ValueError("every URL must have the same scheme, vhost and credentials")
    return urls


def _comma_separated(value: Any) -> list[Any]:
    """`"a, b,c"` from the environment, or a list/tuple given in code, as a list of items."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def _at_least(value: SecretStr, length: int) -> SecretStr:
    secret = value.get_secret_value()
    if len(secret) < length or len(set(secret)) < 6:
        raise ValueError(f"must be at least {length} characters and not repetitive")
    return value


class _LogSettings(BaseSettings):
    """The two settings that choose the log format, read alone (as Settings reads them)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=True)

    NODE_ENV: str = "dev"
    LOG_FORMAT: str = ""


def early_log_format() -> str:
    """The log format Settings would choose, for reporting that Settings cannot be read."""
    try:
        raw = _LogSettings()
    except ValueError:
        return "console"
    if raw.LOG_FORMAT in ("json", "console"):
        return raw.LOG_FORMAT
    return "console" if raw.NODE_ENV == "dev" else "json"
