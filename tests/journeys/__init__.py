"""Random user journeys against the job's promises (machine.py: the journeys; promises.py: the contract).

The suite replays a fixed set (tests/e2e/test_journeys.py); ``python -m tests.journeys --minutes 60``
walks new ones until the time is up and prints what they covered.
"""
