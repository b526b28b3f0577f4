"""Command topics in both spellings: brokers that cannot carry a "." get levels instead."""

from __future__ import annotations

import pytest

from protocol import topics


@pytest.mark.parametrize(
    ("topic", "name"),
    [
        ("cabinets/cab-1/cmd/bay.disable", "bay.disable"),
        ("cabinets/cab-1/cmd/bay/disable", "bay.disable"),  # RabbitMQ 3.10, NATS 2.9
        ("cabinets/cab-1/cmd/state.get", "state.get"),
        ("cabinets/cab-1/cmd/state/get", "state.get"),
        ("cabinets/cab-1/cmd/bay//disable", None),
        ("cabinets/cab-1/cmd/", None),
        ("cabinets/cab-1/cmd/bay/", None),
        ("cabinets/cab-2/cmd/bay.disable", None),  # another cabinet's
        ("cabinets/cab-1/reply", None),
    ],
)
def test_a_command_topic_names_one_command_or_none(topic: str, name: str | None) -> None:
    assert topics.command_name("cab-1", topic) == name


def test_the_subscription_takes_both_spellings() -> None:
    assert topics.commands_filter("cab-1") == "cabinets/cab-1/cmd/#"
