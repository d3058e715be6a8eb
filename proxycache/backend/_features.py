"""
What a llama-server lacks of what proxycache relies on, from what it said when
it came up: pure, no Twisted.

Checked on b11549 (xllamacpp) and b11434 (binary):
  - C{POST /slots/N?action=restore} of a file that cannot exist answers 501
    "This server does not support slots action. Start it with --slot-save-path"
    without a save path, 400 "Unable to restore slot: ..." with one.
  - C{--no-slots}: C{/props} C{endpoint_slots} false and C{GET /slots} 501.
  - C{build_info} is C{b11434-unknown} (a binary built with a build number) or
    C{b0-unknown} (xllamacpp, or a build without git metadata: unknown).
Not told by the server at start: C{--cache-ram} (nothing in C{/props} or
C{/metrics}; seen at run time through C{timings.cache_n}, L{RAM_CACHE}),
unified KV (each slot's C{n_ctx} is the whole context then, which looks the
same as per-slot KV with a larger C{-c}), SWA models (no C{n_swa} or
architecture in C{/props} or C{/v1/models}).
"""

from __future__ import annotations

import re
from typing import Any

import attrs

OLDEST_SUPPORTED_BUILD = 11434
# The harmless probe: restoring a file that does not exist (a failed restore clears the slot).
PROBE_FILENAME = "proxycache-probe-none.bin"

SAVES_OFF = "slot save/restore is off (llama-server without --slot-save-path): no disk cache tier"
SLOTS_OFF = "llama-server runs with --no-slots: restarts and busy slots cannot be checked"
RAM_CACHE = (
    "llama-server's own RAM prompt cache (--cache-ram) moves conversations between slots: "
    "start it with --cache-ram 0"
)
BUILD_UNKNOWN = "build unknown ({build}): cannot check it is b{oldest} or newer"
# More slots than any llama-server is run with: a claim beyond it is not believed.  Each request is
# planned over every slot (a /props claiming 300,000 slots cost 2.5 s of the reactor per request).
MAX_SLOTS = 256
TOO_MANY_SLOTS = "it claims {claimed} slots, more than the {cap} a backend may have here: using slots 0-{last}"


@attrs.frozen
class Features:
    """What the backend-up checks found; None: could not tell."""

    slots_endpoint: bool | None = None  # GET /slots answers
    slot_saves: bool | None = None  # slot save/restore enabled (--slot-save-path)


def build_number(build_info: object) -> int | None:
    """C{b11434-unknown} -> 11434; None when unknown (C{b0-...}, missing, unparsable)."""
    match = re.match(r"b(\d+)", build_info) if isinstance(build_info, str) else None
    number = int(match.group(1)) if match else 0
    return number or None


def saves_enabled(status: int) -> bool | None:
    """What the restore probe's status says about slot saves: 501 is off, another 4xx on."""
    if status == 501:
        return False
    if status in (200, 400):  # 400: no such file (200: there was one)
        return True
    return None  # 401, a timeout, ...: cannot tell


def backend_warnings(props: dict[str, Any], features: Features, configured_slots: int | None) -> list[str]:
    """Short warnings about a llama-server that lacks what proxycache relies on."""
    warnings = []
    total = props.get("total_slots")
    if configured_slots is not None and total is not None and total != configured_slots:
        warnings.append(f"--slots is {configured_slots} but llama-server has {total} slots; using {total}")
    if props.get("endpoint_slots") is False or features.slots_endpoint is False:
        warnings.append(SLOTS_OFF)
    if features.slot_saves is False:
        warnings.append(SAVES_OFF)
    build = props.get("build_info")
    number = build_number(build)
    if number is not None and number < OLDEST_SUPPORTED_BUILD:
        warnings.append(f"build b{number} is older than b{OLDEST_SUPPORTED_BUILD}, the oldest supported")
    return warnings


def build_notice(props: dict[str, Any]) -> str | None:
    """Information, not a problem: the build does not say its number."""
    build = props.get("build_info")
    if build_number(build) is None:
        return BUILD_UNKNOWN.format(build=build, oldest=OLDEST_SUPPORTED_BUILD)
    return None


def usable_slots(claimed: object, configured: int | None) -> tuple[int, str | None]:
    """
    How many slots to plan on, from what C{/props} claims (else C{--slots}, else
    1), at most L{MAX_SLOTS}; and a warning when the claim was cut down.
    """
    known = claimed if isinstance(claimed, int) and not isinstance(claimed, bool) and claimed > 0 else None
    total = known or configured or 1
    if total <= MAX_SLOTS:
        return total, None
    return MAX_SLOTS, TOO_MANY_SLOTS.format(claimed=total, cap=MAX_SLOTS, last=MAX_SLOTS - 1)
