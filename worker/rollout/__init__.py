"""Model rollout: a queue's workers follow its published versions and its rollout
(canary, shadow, promote, abort) without a restart.

    state.py     the rollout in Redis and the commands that change it (atomically)
    serving.py   the worker side: versions loaded beside each other, switched between batches
    tally.py     per-version counts and the shadow comparison
    cli.py       `imgq rollout start|status|promote|abort`
"""
