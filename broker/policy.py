"""The Resolve policy: decided before any credential leaves the broker.

Three kinds, chosen by the config's ``policy:`` block:

* none given: :class:`AllowAll`;
* ``rules:``: :class:`RulePolicy`, first matching rule wins, else ``default`` (deny unless set);
* ``entry_point: <name>``: a decision function an operator ships in their own package, registered
  under the ``credential_broker.policy`` entry-point group. It is called with a
  :class:`PolicyRequest` and returns a bool or a :class:`Decision` (or an awaitable of either).

A denial is PERMISSION_DENIED with the reason; a policy that raises, or returns anything else,
denies (fail closed).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from broker.config import PolicyConfig, PolicyRuleConfig
from broker.errors import ConfigError, PolicyDenied
from broker.logs import fields, get_logger

ENTRY_POINT_GROUP = "credential_broker.policy"


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """What a policy decides on. ``claims`` is the verified user token's claims, or None when
    no identity is configured."""

    user_id: str
    upstream: str
    mode: str
    claims: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str = ""


DecisionFunction = Callable[[PolicyRequest], "bool | Decision | Awaitable[bool | Decision]"]


class Policy(Protocol):
    def decide(self, request: PolicyRequest) -> bool | Decision | Awaitable[bool | Decision]: ...


class AllowAll:
    """The default: every Resolve is allowed."""

    def decide(self, request: PolicyRequest) -> Decision:
        return Decision(True)


def _claim_matches(claims: Mapping[str, Any] | None, name: str, wanted: str | tuple[str, ...]) -> bool:
    if claims is None:
        return False
    value = claims.get(name)
    options = (wanted,) if isinstance(wanted, str) else wanted
    if isinstance(value, str):
        return value in options
    if isinstance(value, list):
        return any(isinstance(v, str) and v in options for v in value)
    return False


class RulePolicy:
    """A rule list from the config: the first rule whose upstreams, users and claims all match
    decides; if none does, ``default`` decides."""

    def __init__(self, rules: tuple[PolicyRuleConfig, ...], default: str) -> None:
        self._rules = rules
        self._default = default

    @staticmethod
    def _matches(rule: PolicyRuleConfig, request: PolicyRequest) -> bool:
        return (
            ("*" in rule.upstreams or request.upstream in rule.upstreams)
            and ("*" in rule.users or request.user_id in rule.users)
            and all(_claim_matches(request.claims, n, v) for n, v in rule.claims.items())
        )

    def decide(self, request: PolicyRequest) -> Decision:
        for index, rule in enumerate(self._rules):
            if self._matches(rule, request):
                allowed = rule.effect == "allow"
                reason = rule.reason or (
                    f"policy rule {index} {'allows' if allowed else 'denies'} this user for upstream "
                    f"{request.upstream!r}"
                )
                return Decision(allowed, reason)
        if self._default == "allow":
            return Decision(True)
        return Decision(False, f"no policy rule allows this user to resolve upstream {request.upstream!r}")


class FunctionPolicy:
    """Wraps an operator's decision function."""

    def __init__(self, function: DecisionFunction, name: str) -> None:
        self._function = function
        self.name = name

    def decide(self, request: PolicyRequest) -> bool | Decision | Awaitable[bool | Decision]:
        return self._function(request)


def load_entry_point(name: str) -> FunctionPolicy:
    """The decision function registered as ``name`` in the ``credential_broker.policy`` group."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise ConfigError(
            f"policy.entry_point: no {ENTRY_POINT_GROUP} entry point named {name!r} is installed"
        )
    try:
        function = found[0].load()
    except Exception as exc:
        raise ConfigError(
            f"policy.entry_point: {name!r} could not be loaded ({type(exc).__name__})"
        ) from None
    if not callable(function):
        raise ConfigError(f"policy.entry_point: {name!r} is not callable")
    return FunctionPolicy(function, name)


def build_policy(config: PolicyConfig | None) -> Policy:
    """The policy a config asks for. Raises ConfigError for a plug-in that can't be loaded."""
    if config is None:
        return AllowAll()
    if config.entry_point is not None:
        if config.rules:
            raise ConfigError("policy: set either rules or entry_point, not both")
        return load_entry_point(config.entry_point)
    return RulePolicy(config.rules, config.default)


class PolicyEnforcer:
    """Runs a policy and turns its answer into a pass or a PolicyDenied, failing closed."""

    def __init__(self, policy: Policy, logger: logging.Logger | None = None) -> None:
        self.policy = policy
        self._log = logger or get_logger()
        #: The default policy: nothing to ask, so Resolve skips building a request for it.
        self.allows_all = type(policy) is AllowAll

    async def check(self, request: PolicyRequest) -> None:
        try:
            answer: Any = self.policy.decide(request)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception as exc:
            self._log.error(
                "policy failed; denied",
                extra=fields(user_id=request.user_id, upstream=request.upstream, error=type(exc).__name__),
            )
            raise PolicyDenied("the policy could not be evaluated; denied") from None
        if isinstance(answer, bool):
            answer = Decision(answer)
        if not isinstance(answer, Decision):
            self._log.error(
                "policy returned neither a bool nor a Decision; denied",
                extra=fields(user_id=request.user_id, upstream=request.upstream),
            )
            raise PolicyDenied("the policy could not be evaluated; denied")
        if not answer.allowed:
            reason = (
                answer.reason
                or f"the policy does not allow this user to resolve upstream {request.upstream!r}"
            )
            self._log.info(
                "resolve denied by policy", extra=fields(user_id=request.user_id, upstream=request.upstream)
            )
            raise PolicyDenied(reason)
