"""Broker messages: small versioned commands that carry ids and due times, never payload data.

MySQL is the source of truth; a consumer re-reads the row a command names. The AMQP properties
carry `message_id`, `type` (the command's TYPE), `content_type` and the schema version header
(and, on a delayed message, the cascade's bit headers: shared/infra/delay.py).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Command(BaseModel):
    """Base of every broker command. `destination` names the queue that consumes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1
    DESTINATION: ClassVar[str]

    # How many times this command has been retried after a transient failure.
    attempt: int = 0


class ExpireTask(Command):
    TYPE: ClassVar[str] = "task.expire"
    DESTINATION: ClassVar[str] = "expiry"

    task_id: str
    due_at_ms: int

    def carried(self) -> tuple[Timer, ...]:
        """The timers this message carries (one)."""
        return (Timer(task_id=self.task_id, due_at_ms=self.due_at_ms),)


class Timer(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: str
    due_at_ms: int


class ExpireTasks(Command):
    """Timers published together that leave the cascade in the same unit (the adds of one
    commit, due in the same second): one message for all, each task fired at its own time."""

    TYPE: ClassVar[str] = "task.expire_many"
    DESTINATION: ClassVar[str] = "expiry"
    MAX_TIMERS: ClassVar[int] = 500

    timers: tuple[Timer, ...] = Field(min_length=1, max_length=MAX_TIMERS)

    def carried(self) -> tuple[Timer, ...]:
        """The timers this message carries."""
        return self.timers


class DeliverCallback(Command):
    TYPE: ClassVar[str] = "callback.deliver"
    DESTINATION: ClassVar[str] = "callbacks"

    event_id: str


class DeliverCallbacks(Command):
    """Several events committed together (an expiry batch, a sweep): one message for all.

    Their first attempt is made from this message; a later attempt of any one of them is a
    `DeliverCallback` of its own.
    """

    TYPE: ClassVar[str] = "callback.deliver_many"
    DESTINATION: ClassVar[str] = "callbacks"
    MAX_EVENTS: ClassVar[int] = 500

    event_ids: tuple[str, ...] = Field(min_length=1, max_length=MAX_EVENTS)


class SendEmail(Command):
    """Published to `email-promotional` instead for PROMOTIONAL mail (see shared.infra.broker)."""

    TYPE: ClassVar[str] = "email.send"
    DESTINATION: ClassVar[str] = "email-transactional"

    email_id: str


class ProcessSesEvent(Command):
    TYPE: ClassVar[str] = "ses.event"
    DESTINATION: ClassVar[str] = "ses-events"

    sns_message_id: str


COMMANDS: dict[str, type[Command]] = {
    c.TYPE: c
    for c in (
        ExpireTask,
        ExpireTasks,
        DeliverCallback,
        DeliverCallbacks,
        SendEmail,
        ProcessSesEvent,
    )
}
