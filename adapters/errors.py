"""The one error type of the adapters package."""

from __future__ import annotations


class BankError(ValueError):
    """A bank (or a checkpoint being converted into one) was refused.

    The message is one line that names the bank, the file and the reason, e.g.
    ``bank 'x': weights.safetensors: tensor layers.3.mlp.gate_proj.lora_a has shape (4, 8, 63), expected (4, 8, 64)``.
    ``bank``, ``file`` and ``reason`` are kept apart for callers that build their own messages.
    """

    def __init__(self, reason: str, *, bank: str | None = None, file: str | None = None):
        self.reason = " ".join(str(reason).split())  # one line, whatever the source text held
        self.bank = bank
        self.file = file
        parts = [f"bank {bank!r}" if bank else None, file, self.reason]
        super().__init__(": ".join(p for p in parts if p))

    def within(self, *, bank: str | None = None, file: str | None = None) -> "BankError":
        """The same error with the bank name and file filled in where they were still unknown."""
        return BankError(self.reason, bank=self.bank or bank, file=self.file or file)


class BankBudgetExceeded(BankError):
    """The bank does not fit the memory budget for loaded banks (the message names the budget)."""

    def within(self, *, bank: str | None = None, file: str | None = None) -> "BankBudgetExceeded":
        return BankBudgetExceeded(self.reason, bank=self.bank or bank, file=self.file or file)
