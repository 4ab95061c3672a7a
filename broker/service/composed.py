"""``BrokerService``: the use cases of broker/service/ combined into the one object the
servicer, the hosted connect listener and the background refresher call.
"""

from __future__ import annotations

from broker.service.connect_flow import ConnectFlowService
from broker.service.refresh import RefreshService
from broker.service.resolve import ResolveService


class BrokerService(ResolveService, RefreshService, ConnectFlowService):
    """Obtains, stores, refreshes and hands out per-user credentials."""
