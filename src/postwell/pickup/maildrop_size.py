"""The size Postfix's mailq shows for a message still in the maildrop.

Postfix lists such a message with the size of postdrop's file: its records
(type byte, 7-bit length varint, payload), which sendmail writes as T time,
A attributes, F full name, S sender, R recipients (each after an A
notify_flags record with -N), M, one N record per content line (L records
for each line_length_limit piece of a longer line), X, E.  postwell's
maildrop file is its own format (``pickup/maildrop.py``), so the listing
computes that size from the envelope and one pass over the content, in
constant memory.  Checked against Postfix 3.7's sendmail in
tests/test_cli_leftovers.py.

Caveat: postwell's sendmail ends an unterminated last line with a newline,
so a last line without one whose length is an exact multiple of
line_length_limit counts one empty N record (2 bytes) more than Postfix.
"""

from __future__ import annotations

_DSN_NOTIFY = {"NEVER": 1, "SUCCESS": 2, "FAILURE": 4, "DELAY": 8}
_DSN_RET = {"FULL": 1, "HDRS": 2}


def _record(payload_len: int) -> int:
    size = 1
    n = payload_len
    while True:
        size += 1
        n >>= 7
        if not n:
            return size + payload_len


def postdrop_size(envelope, content_chunks, line_limit: int = 2048) -> int:
    """The size of the file Postfix's sendmail/postdrop would have written."""
    line_limit = max(1, line_limit)
    sec, _, frac = f"{envelope.submit_time:.6f}".partition(".")
    size = _record(len(f"{sec} {int(frac or 0)}"))               # T "sec usec"
    attrs = []
    if envelope.envid is not None:
        attrs.append(f"envelope_id={envelope.envid}")
    if envelope.ret is not None:
        attrs.append(f"ret_flags={_DSN_RET.get(envelope.ret.upper(), 0)}")
    attrs.append(f"rewrite_context={envelope.rewrite or 'local'}")
    if envelope.body is not None:
        attrs.append("encoding=" + ("8bit" if envelope.body.upper() == "8BITMIME" else "7bit"))
    if envelope.notify is not None:
        # sendmail repeats it before each recipient record.
        flags = sum(_DSN_NOTIFY.get(w.strip().upper(), 0) for w in envelope.notify.split(","))
        attrs += [f"notify_flags={flags}"] * len(envelope.recipients)
    for a in attrs:
        size += _record(len(a.encode("utf-8", "surrogateescape")))
    if envelope.fullname is not None:
        size += _record(len(envelope.fullname.encode("utf-8", "surrogateescape")))
    size += _record(len(envelope.sender.encode("utf-8", "surrogateescape")))
    for r in envelope.recipients:
        size += _record(len(r.encode("utf-8", "surrogateescape")))
    size += 3 * _record(0)                                        # M, X, E
    # Content: Postfix's rec_streamlf_get() takes line_limit bytes at a time
    # (an L record each) until it meets the newline, whose rest, possibly
    # empty, is an N record; an unterminated last line ends at end of file.
    line = 0
    for chunk in content_chunks:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                line += len(chunk) - start
                break
            line += nl - start
            size += (line // line_limit) * _record(line_limit) + _record(line % line_limit)
            line = 0
            start = nl + 1
    if line:
        size += (line // line_limit) * _record(line_limit)
        if line % line_limit:
            size += _record(line % line_limit)
    return size
