"""Decision functions registered as credential_broker.policy entry points by tests/test_policy.py."""

from __future__ import annotations

from broker.policy import Decision, PolicyRequest


def only_alice(request: PolicyRequest) -> Decision:
    if request.user_id == "alice":
        return Decision(True)
    return Decision(False, "plug-in: only alice may resolve")


async def async_engineers(request: PolicyRequest) -> bool:
    groups = (request.claims or {}).get("groups", [])
    return "eng" in groups


def broken(request: PolicyRequest) -> Decision:
    raise RuntimeError(f"policy backend down for {request.user_id}")


def confused(request: PolicyRequest) -> str:
    return "yes"
