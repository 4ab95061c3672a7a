"""The broker's use cases: connect flow, refresh and resolve. No gRPC, no SQL here.

Store writes run in worker threads (``asyncio.to_thread``). The single-row read of a
credential runs inline on SQLite, because it takes microseconds and a thread hop would cost
more; on PostgreSQL (``vault.must_wait``) it runs in a worker thread too, unless the read cache
answers, so a read stuck behind a lock or a slow network stalls no other call.

- base.py: the constructor, shared state (single flights, refresh lease owner) and upstream lookups
- connect_flow.py: start, reuse, complete and deny connect flows; ``check_iss`` (RFC 9207)
- refresh.py: refresh on demand, for Resolve and in the background; lease; ``refresh_token_expiry``
- resolve.py: Resolve: the stored (or exchanged) token, refreshed when due, or how to connect
- composed.py: ``BrokerService``, the use cases combined
"""

from broker.service.composed import BrokerService
from broker.service.connect_flow import check_iss
from broker.service.refresh import refresh_token_expiry

__all__ = ["BrokerService", "check_iss", "refresh_token_expiry"]
