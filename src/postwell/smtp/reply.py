"""SMTP replies (RFC 5321 4.2, enhanced codes RFC 3463 / RFC 2034)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int                 # 250, 354, 550, ...
    text: str                 # "Ok"; multi-line replies separate lines with "\n"
    enhanced: str | None = None   # "2.1.0"; None when the reply carries none (220, 354, EHLO)

    def lines(self, enhanced_status_codes: bool = True) -> list[str]:
        parts = self.text.split("\n") if self.text else [""]
        prefix = f"{self.enhanced} " if (self.enhanced and enhanced_status_codes) else ""
        out = []
        for i, part in enumerate(parts):
            sep = " " if i == len(parts) - 1 else "-"
            line = f"{self.code}{sep}{prefix}{part}"
            # RFC 4954 4: an empty SASL challenge is still "334" SP.
            out.append(line.rstrip() if not part and self.code != 334 else line)
        return out

    def to_bytes(self, enhanced_status_codes: bool = True) -> bytes:
        return "".join(l + "\r\n" for l in self.lines(enhanced_status_codes)).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        # One-line form as Postfix logs it: "554 5.7.1 <x@y>: Relay access denied"
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text.replace(chr(10), ' ')}"

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500
