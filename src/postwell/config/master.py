"""master.cf parsing (minimal core; the config owner completes it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MasterService:
    name: str            # service field as written ("smtp", "127.0.0.1:2525", "submission")
    type: str            # inet | unix | unix-dgram | fifo | pass
    private: bool
    unpriv: bool
    chroot: bool
    wakeup: str
    maxproc: int | None  # None = default_process_limit
    command: str         # "smtpd", "qmgr", ...
    args: list[str] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)   # -o name=value
    line: int = 0


def parse_master_cf(text: str, filename: str = "master.cf") -> list[MasterService]:
    raise NotImplementedError
