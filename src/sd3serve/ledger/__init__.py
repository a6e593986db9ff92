"""The ledger: keys, credits, tasks, idempotent answers, webhooks and live processes, in one database."""

from sd3serve.ledger.credits import MAX_BALANCE, CreditHold
from sd3serve.ledger.database import Database, Tx
from sd3serve.ledger.keys import KeyInfo
from sd3serve.ledger.ledger import HoldWork, Ledger, Reservation

__all__ = ["MAX_BALANCE", "CreditHold", "Database", "HoldWork", "KeyInfo", "Ledger", "Reservation", "Tx"]
