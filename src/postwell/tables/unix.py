"""unix:passwd.byname and unix:group.byname: the system user and group
databases, answering with the /etc/passwd or /etc/group line as Postfix's
dict_unix does."""

from __future__ import annotations

import grp
import pwd

from .base import Table, TableError


def _passwd_line(p) -> str:
    return ":".join([p.pw_name, p.pw_passwd, str(p.pw_uid), str(p.pw_gid),
                     p.pw_gecos, p.pw_dir, p.pw_shell])


def _group_line(g) -> str:
    return ":".join([g.gr_name, g.gr_passwd, str(g.gr_gid), ",".join(g.gr_mem)])


class UnixTable(Table):
    type = "unix"

    def __init__(self, spec: str, name: str):
        super().__init__(spec, name)
        if name == "passwd.byname":
            self._get = self._passwd
        elif name == "group.byname":
            self._get = self._group
        else:
            raise TableError(f"unknown table: {spec}")

    @staticmethod
    def _passwd(key):
        try:
            return _passwd_line(pwd.getpwnam(key))
        except (KeyError, ValueError):
            return None

    @staticmethod
    def _group(key):
        try:
            return _group_line(grp.getgrnam(key))
        except (KeyError, ValueError):
            return None

    def _lookup(self, key):
        return self._get(key)

    def items(self):
        raise TableError(f"table {self.spec}: sequence operation is not supported")
