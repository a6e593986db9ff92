"""The service: between the HTTP API and the model engine and ledger.

Routes decode their wire format into an :class:`Order` (or a read) and encode what comes back; everything else —
admission, holds and charges, idempotency, running on the engine, progress, webhooks, reads of tasks and accounts —
happens here. ``api/`` imports from this package only, never from ``engine/`` or ``ledger/`` (a test walks the
imports); the domain types the wire needs are exported here.
"""

from sd3serve.engine.protocol import Engine
from sd3serve.ledger import MAX_BALANCE, Database
from sd3serve.service.accounts import Accounts, KeyInfo
from sd3serve.service.generation import ClientGone, Delivery, GenerationService, Submission
from sd3serve.service.metrics import CONTENT_TYPE_LATEST, Metrics
from sd3serve.service.order import GenerationJob, InitImage, Order, Output, Webhook
from sd3serve.service.reads import CANCELLED, COMPLETED, FAILED, QUEUED, TaskProgress, TaskReads, TaskView
from sd3serve.service.runtime import Services, running
from sd3serve.service.streams import StreamHub, StreamSlot, stream_limit

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "CONTENT_TYPE_LATEST",
    "FAILED",
    "MAX_BALANCE",
    "QUEUED",
    "Accounts",
    "ClientGone",
    "Database",
    "Delivery",
    "Engine",
    "GenerationJob",
    "GenerationService",
    "InitImage",
    "KeyInfo",
    "Metrics",
    "Order",
    "Output",
    "Services",
    "StreamHub",
    "StreamSlot",
    "Submission",
    "TaskProgress",
    "TaskReads",
    "TaskView",
    "Webhook",
    "running",
    "stream_limit",
]
