"""Postfix's defaults for the parameters postwell knows (newest safe defaults).

Values are the unexpanded defaults as `postconf -d` prints them.  The config
owner extends this table; every parameter postwell reads must be here.
"""

DEFAULTS: dict[str, str] = {
    "mail_name": "postwell",
    "syslog_name": "postfix",
    "syslog_facility": "mail",
    "maillog_file": "",
    "myhostname": "localhost.localdomain",
    "mydomain": "localdomain",
    "myorigin": "$myhostname",
    "mydestination": "$myhostname, localhost.$mydomain, localhost",
    "smtpd_banner": "$myhostname ESMTP $mail_name",
    "queue_directory": "/var/spool/postfix",
    "data_directory": "/var/lib/postfix",
    "mail_owner": "postfix",
    "message_size_limit": "10240000",
    "mailbox_size_limit": "51200000",
    "smtpd_recipient_limit": "1000",
    "line_length_limit": "2048",
    "smtpd_timeout": "300s",
    "mynetworks_style": "host",
    "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination",
}
