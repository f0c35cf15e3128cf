"""postalias(1): build, query, dump and edit aliases(5) databases.

    postalias [-Nfinoprsuvw] [-c config_dir] [-d key] [-q key] [file_type:]file...

Shares postmap's machinery; the source format is aliases(5) (see
postwell.tables.aliases) and -s prints "name:<TAB>value" like Postfix.
"""

from __future__ import annotations

import sys

from postwell.cli.postmap import run


def main(argv=None) -> int:
    return run(sys.argv[1:] if argv is None else list(argv), "postalias")


if __name__ == "__main__":
    sys.exit(main())
