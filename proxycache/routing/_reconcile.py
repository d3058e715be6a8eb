"""
Did llama.cpp do what the plan expected?  Read from its C{timings}: C{cache_n}
prompt tokens reused, C{prompt_n} computed.

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

from proxycache.routing._plan import Decision, Plan, Request

# Reusing less than this share of the planned prefix means the plan was wrong.
REUSE_SHORTFALL = 0.5
# llama.cpp reusing this many tokens on a request planned as a miss means that
# something other than the proxy (its RAM prompt cache) put them there.
UNPLANNED_REUSE_TOKENS = 256


def expected_reuse(plan: Plan, request: Request, cache_n: int, prompt_n: int) -> float:
    """
    Prompt tokens the plan expected llama.cpp to reuse: the planned share of
    the request's blocks, of the request's prompt tokens.  Only the request's
    side is measured: a saved entry also holds its reply, whose tokens rarely
    re-tokenize the same in the next prompt.
    """
    if plan.decision not in (Decision.HIT, Decision.RESTORE) or not request.fingerprint.blocks:
        return 0.0
    return (cache_n + prompt_n) * plan.common_blocks / len(request.fingerprint.blocks)


def fell_short(plan: Plan, request: Request, cache_n: int, prompt_n: int) -> bool:
    """
    Did llama.cpp reuse far less than the plan expected?  After a hit, the
    proxy's map is stale (llama-server restarted, or its own RAM cache moved
    things); after a restore, the restore did not take (an SWA/hybrid model
    without C{--swa-full}).
    """
    expected = expected_reuse(plan, request, cache_n, prompt_n)
    return expected > 0 and cache_n < REUSE_SHORTFALL * expected


def reused_unplanned(plan: Plan, cache_n: int, prompt_n: int) -> bool:
    """
    llama.cpp reused much more than the plan could have: its own prompt cache
    (--cache-ram) moved a conversation into this slot behind the proxy's back.
    """
    return (
        plan.decision in (Decision.MISS, Decision.SMALL)
        and cache_n >= UNPLANNED_REUSE_TOKENS
        and cache_n > prompt_n
    )


def carried_out(decision: Decision, plan: Plan, request: Request, cache_n: int, prompt_n: int) -> Decision:
    """
    C{decision} (what the proxy did before it sent the request) as llama.cpp's
    timings say it went: a hit or restore whose prefix llama.cpp did not reuse
    (L{fell_short}: its slot was cleared behind the proxy's back, a restore did
    not take) computed the prompt, a miss; a miss on which it reused most of the
    prompt (a slot that held it unknown to the proxy: its own prompt cache, a
    restore given up on that llama.cpp made all the same, the proxy restarted)
    was a hit.  A small request computed from scratch is 'small'.
    """
    if decision in (Decision.HIT, Decision.RESTORE) and fell_short(plan, request, cache_n, prompt_n):
        decision = Decision.MISS
    elif decision in (Decision.MISS, Decision.SMALL) and cache_n >= UNPLANNED_REUSE_TOKENS and cache_n > prompt_n:
        return Decision.HIT
    return Decision.SMALL if request.small and decision is Decision.MISS else decision
