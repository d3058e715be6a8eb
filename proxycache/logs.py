"""
Log observers for twistd's C{--logger} option.

C{twistd -n --logger=proxycache.logs.json_to_stdout proxycache ...} writes one
JSON object per line (twisted.logger's event format) for log shippers.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_to_stdout() -> ILogObserver:
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
