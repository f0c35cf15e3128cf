"""postwell saslpasswd: manage the built-in SASL password file.

Flags follow Cyrus's saslpasswd2 where they overlap::

    postwell saslpasswd [-f file] [-u domain] [-s scheme] [-p] [-c] user   add or change
    postwell saslpasswd [-f file] [-u domain] -d user                      delete
    postwell saslpasswd [-f file] -l                                        list users

The password is read from standard input with -p (one line, no prompt),
otherwise prompted for twice on the terminal.  The default file is the one
smtpd uses: smtpd_sasl_path resolved as in postwell.sasl.passwdfile
(``$config_directory/sasl_passwd`` for the default).  The file is rewritten
atomically (temporary file, fsync, rename) with mode 0640; existing lines,
comments and order are kept.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import os
import sys
import tempfile

from ..sasl.passwdfile import MAX_FILE, parse_passwd, resolve_path
from ..sasl.passwords import SCHEMES, HashError, hash_password

PROG = "postwell saslpasswd"


def default_scheme() -> str:
    try:
        import argon2  # noqa: F401
        return "ARGON2ID"
    except ImportError:
        pass
    try:
        import bcrypt  # noqa: F401
        return "BLF-CRYPT"
    except ImportError:
        return "SHA512-CRYPT"


def default_file() -> str:
    config_dir = os.environ.get("MAIL_CONFIG") or "/etc/postfix"
    path = "smtpd"
    try:
        from ..config import load_config
        cfg = load_config(config_dir)
        if cfg.get("smtpd_sasl_type").strip().lower() == "postwell":
            path = cfg.get("smtpd_sasl_path")
    except Exception:
        pass
    return resolve_path(path, config_dir)


def _read(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return []
    if len(text) > MAX_FILE:
        raise SystemExit(f"{PROG}: fatal: {path}: file too large")
    return text.splitlines()


def _write(path: str, lines: list[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = 0o640, None
    fd, tmp = tempfile.mkstemp(prefix=".saslpasswd.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("Password: ")
    again = getpass.getpass("Again (for verification): ")
    if first != again:
        raise SystemExit(f"{PROG}: fatal: passwords don't match")
    return first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="manage postwell's SASL password file")
    ap.add_argument("-f", dest="file", help="password file (default: from main.cf)")
    ap.add_argument("-u", dest="domain", default="", help="domain appended to the user name")
    ap.add_argument("-s", dest="scheme", default=None,
                    help=f"hash scheme: {', '.join(SCHEMES)} (default: best available)")
    ap.add_argument("-p", dest="pipe", action="store_true", help="read the password from stdin")
    ap.add_argument("-c", dest="create", action="store_true",
                    help="accepted for saslpasswd2 compatibility (users are created as needed)")
    ap.add_argument("-d", dest="delete", action="store_true", help="delete the user")
    ap.add_argument("-l", dest="list", action="store_true", help="list users")
    ap.add_argument("user", nargs="?")
    args = ap.parse_args(argv)
    path = args.file or default_file()

    if args.list:
        users, problems = parse_passwd("\n".join(_read(path)), path)
        for p in problems:
            print(f"{PROG}: warning: {p}", file=sys.stderr)
        for name, stored in users.items():
            scheme = stored[1:stored.index("}")] if stored.startswith("{") and "}" in stored else "?"
            print(f"{name}: {scheme}")
        return 0
    if not args.user:
        ap.error("a user name is needed")
    user = args.user if not args.domain else f"{args.user}@{args.domain}"
    if any(c in user for c in ":\n\r\0") or user.startswith("#") or user != user.strip():
        print(f"{PROG}: fatal: invalid user name: {user!r}", file=sys.stderr)
        return 1

    lock_path = path + ".lock"
    lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        lines = _read(path)
        index = next((i for i, line in enumerate(lines)
                      if line.partition(":")[0].strip() == user
                      and not line.lstrip().startswith("#")), None)
        if args.delete:
            if index is None:
                print(f"{PROG}: fatal: user {user} not found in {path}", file=sys.stderr)
                return 1
            del lines[index]
            _write(path, lines)
            return 0
        password = _read_password(args.pipe)
        if not password:
            print(f"{PROG}: fatal: empty password", file=sys.stderr)
            return 1
        try:
            stored = hash_password(password, args.scheme or default_scheme())
        except HashError as e:
            print(f"{PROG}: fatal: {e}", file=sys.stderr)
            return 1
        if index is None:
            lines.append(f"{user}:{stored}")
        else:
            # Keep any extra Dovecot fields after the hash.
            rest = lines[index].split(":", 2)
            lines[index] = f"{user}:{stored}" + (f":{rest[2]}" if len(rest) > 2 else "")
        _write(path, lines)
        return 0
    finally:
        os.close(lock_fd)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
