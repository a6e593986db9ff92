"""Bounds on credit amounts, shared by the admin API and the CLI: balances are kept in micro-credits in signed
64-bit columns, so an amount must fit them and must not be finer than one micro-credit (it would be rounded)."""

from __future__ import annotations

from decimal import Decimal

from sd3serve.ledger.credits import MAX_BALANCE

CREDIT_DECIMALS = 6  # one micro-credit, the store's unit
MAX_CREDITS_PER_CALL = Decimal(10**9)  # one `keys create` or `add-credits`


def amount_error(credits: Decimal, *, positive: bool) -> str | None:
    """Why ``credits`` is not an acceptable amount, or None."""
    if not credits.is_finite():
        return "credits must be a finite number"
    if credits < 0 or (positive and credits == 0):
        return "credits must be a positive number" if positive else "credits must be a non-negative number"
    if credits > MAX_CREDITS_PER_CALL:
        return f"at most {MAX_CREDITS_PER_CALL} credits per call"
    if -credits.normalize().as_tuple().exponent > CREDIT_DECIMALS:  # type: ignore[operator]
        return f"credits have at most {CREDIT_DECIMALS} decimal places (one micro-credit)"
    return None


__all__ = ["CREDIT_DECIMALS", "MAX_BALANCE", "MAX_CREDITS_PER_CALL", "amount_error"]
