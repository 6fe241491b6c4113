"""Rewards for the GRPO trainer tests (imported by name, as a user's `--reward module:function`)."""


def digits(problem, response: str) -> float:
    """Share of the response's characters that are digits: a random policy sits well below 1."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


def broken(problem, response: str) -> float:
    raise ZeroDivisionError("on purpose")
