"""Bounds on credit amounts, shared by the admin API and the CLI: balances are kept in micro-credits in signed
64-bit columns, so an amount must fit them and must not be finer than one micro-credit (it would be rounded)."""

from __future__ import annotations

from decimal import Decimal

CREDIT_DECIMALS = 6  # one micro-credit, the store's unit
MAX_CREDITS_PER_CALL = Decimal(10**9)  # one `keys create` or `add-credits`
MAX_BALANCE = Decimal(9 * 10**12)  # a balance; 2**63 - 1 micro-credits is about 9.22e12 credits


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


def balance_error(balance: float, credits: Decimal) -> str | None:
    """Why adding ``credits`` to ``balance`` would overflow the store, or None."""
    if Decimal(str(balance)) + credits > MAX_BALANCE:
        return f"the balance would exceed the maximum of {MAX_BALANCE} credits"
    return None
