"""verify(8): address verification, as Postfix 3.7 does it.

Parts (all in this package):

* ``cache.VerifyCache``: the address_verify_map records ("status:probed:updated:text",
  Postfix's own layout) with the positive/negative expire and refresh rules;
* ``service.serve(config)``: the verify service the master starts (master.cf
  ``verify unix - - n - 1 verify``), listening on ``$queue_directory/private/verify``
  (``address_verify_service_name``); on a query for an unknown or stale address it
  queues a probe through cleanup;
* ``client.VerifyClient``: what the smtpd (reject_unverified_*) and the qmgr (probe
  results) use to talk to it;
* ``probe``: the qmgr and delivery-agent side of probes.

Probe messages carry the queue-file attribute ``postwell_verify`` (``VERIFY_ATTRIBUTE``):
``mta`` for the service's probes (Postfix's DEL_REQ_FLAG_MTA_VRFY).  The qmgr hands it
to the agents in ``DeliveryRequest.attributes``; agents report what a delivery would
do without delivering; the qmgr logs ``status=deliverable``/``undeliverable``, sends
the result to the verify service and removes the probe: never a bounce, never a
deferral.

Wire format between client and service (postwell's own; both ends live here): one
request per line, fields separated by TAB; every request gets one reply line.

=========================================  ===========================
request                                    reply
=========================================  ===========================
``query<TAB>ADDR``                         ``ok<TAB>STATUS<TAB>TEXT``
``update<TAB>ADDR<TAB>STATUS<TAB>TEXT``    ``ok``
=========================================  ===========================

A malformed request gets ``bad`` (Postfix's VRFY_STAT_BAD).  STATUS is Postfix's
recipient status: 0 deliverable, 1 deferred, 2 bounced, 3 in progress.
"""

from __future__ import annotations

import os

STATUS_OK, STATUS_DEFER, STATUS_BOUNCE, STATUS_TODO = 0, 1, 2, 3
VERIFY_ATTRIBUTE = "postwell_verify"
MTA_PROBE = "mta"
USER_PROBE = "user"       # sendmail -bv (Postfix's DEL_REQ_FLAG_USR_VRFY): a report to the sender
IN_PROGRESS = "Address verification in progress"
MAX_LINE = 8192           # a request longer than this ends the stream

try:  # start-up warnings name set-but-ignored parameters; these are honoured here
    from postwell.config.registry import register_implemented as _register
except ImportError:  # pragma: no cover
    def _register(*names):
        pass
_register("address_verify_map", "address_verify_sender", "address_verify_positive_expire_time",
          "address_verify_positive_refresh_time", "address_verify_negative_cache",
          "address_verify_negative_expire_time", "address_verify_negative_refresh_time",
          "address_verify_cache_cleanup_interval", "address_verify_poll_count",
          "address_verify_poll_delay", "address_verify_service_name",
          "unverified_recipient_defer_code", "unverified_recipient_reject_code",
          "unverified_recipient_reject_reason", "unverified_recipient_tempfail_action",
          "unverified_sender_defer_code", "unverified_sender_reject_code",
          "unverified_sender_reject_reason", "unverified_sender_tempfail_action",
          "address_verify_pending_request_limit", "smtp_address_verify_target",
          "lmtp_address_verify_target")


def socket_path(config) -> str:
    name = (config.get("address_verify_service_name") or "verify").strip() or "verify"
    return os.path.join(config.get("queue_directory"), "private", name)


def probe_kind(attributes) -> str | None:
    """The probe flag of a queued message (None: ordinary mail)."""
    if not attributes:
        return None
    return attributes.get(VERIFY_ATTRIBUTE) or None


def status_name(status: int) -> str:
    """What the delivery line says for a probe (Postfix's verify_append)."""
    return "deliverable" if status == STATUS_OK else "undeliverable"



def wanted(config) -> bool:
    """Whether the master should offer the service without a master.cf ``verify``
    line: a reject_unverified_* named in main.cf or a master.cf -o override."""
    values = list((getattr(config, "params", None) or {}).values())
    values += list((getattr(config, "overrides", None) or {}).values())
    for svc in getattr(config, "services", None) or []:
        values += list((getattr(svc, "overrides", None) or {}).values())
    return any("reject_unverified_" in (v or "") for v in values)
