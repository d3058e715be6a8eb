"""
The lifecycle soak, short (issue 20; the long one is C{python -m bench.lifecycle}):
conversations over two real llama.cpp servers sharing one save directory while
a backend is upgraded to other weights of the same shape at the same path,
restarted, SIGKILLed and started again, drained and re-added, rolled back, and
the proxy restarted (SIGTERM).  Every answer is the one a reference llama-server running
the serving backend's weights computes from scratch.
"""

from __future__ import annotations

from bench.lifecycle import PLAN, run


def test_through_the_fleets_whole_life_no_answer_is_wrong_and_no_request_fails(tmp_path, models_dir, llama_binary):
    rounds = len(PLAN)  # every event but the proxy's SIGKILL
    report = run(tmp_path, models_dir, conversations=3, rounds=rounds, context_words=300, binary=llama_binary, minutes=30)
    summary = report.summary()
    assert [event.split()[0] for event in report.events] == [event for event, _ in PLAN[: rounds - 1]]
    assert len(report.turns) == 3 * rounds, summary
    assert report.wrong == [], summary
    assert report.failed == [], summary
    assert report.kept_share() > 0.5, summary  # most later turns kept their cache through all that
