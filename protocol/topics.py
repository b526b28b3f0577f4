"""The MQTT topic tree of DESIGN.md §4.3: everything under ``cabinets/<cabinet_id>/``."""

from __future__ import annotations

ROOT = "cabinets"


def status(cabinet_id: str) -> str:
    """Retained online/offline (also the last will)."""
    return f"{ROOT}/{cabinet_id}/status"


def state(cabinet_id: str) -> str:
    """Retained full snapshot."""
    return f"{ROOT}/{cabinet_id}/state"


def telemetry(cabinet_id: str) -> str:
    """Periodic measurements."""
    return f"{ROOT}/{cabinet_id}/telemetry"


def events(cabinet_id: str) -> str:
    """The event stream, QoS 1, from the outbox."""
    return f"{ROOT}/{cabinet_id}/events"


def command(cabinet_id: str, name: str) -> str:
    """A command for this cabinet."""
    return f"{ROOT}/{cabinet_id}/cmd/{name}"


def commands_filter(cabinet_id: str) -> str:
    """The subscription for every command of this cabinet, in either spelling.

    ``cmd/#`` rather than ``cmd/+``: NATS (2.9) disconnects a publisher whose topic has a
    dot and RabbitMQ (3.10) turns the dot into a level, so there ``bay.disable`` travels
    as ``cmd/bay/disable`` (docs/mqtt.md, "Brokers").
    """
    return f"{ROOT}/{cabinet_id}/cmd/#"


def reply(cabinet_id: str) -> str:
    """Where replies go when the command named no MQTT 5 response topic."""
    return f"{ROOT}/{cabinet_id}/reply"


def command_name(cabinet_id: str, topic: str) -> str | None:
    """The command name of a topic under this cabinet's ``cmd/``, or None.

    ``cmd/bay.disable`` and ``cmd/bay/disable`` both name ``bay.disable``: the second is the
    spelling for brokers that cannot carry a dot in a topic.
    """
    prefix = f"{ROOT}/{cabinet_id}/cmd/"
    if not topic.startswith(prefix):
        return None
    levels = topic.removeprefix(prefix).split("/")
    return ".".join(levels) if all(levels) else None
