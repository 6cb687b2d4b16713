"""Synthetic multi-turn chat traffic, for the demo and the benchmarks."""

from __future__ import annotations

import numpy as np


def chat_workload(
    rng: np.random.Generator,
    *,
    system_prompts: int,
    conversations: int,
    turns: int,
    system_tokens: int,
    user_tokens: int,
    reply_tokens: int,
    vocab: int,
) -> list[tuple[int, list[int], list[int]]]:
    """(conversation, prompt tokens, reply tokens) per turn, in arrival order.

    Conversation c starts from system prompt c % system_prompts (shared with
    others) and grows by a user message and a reply each turn; conversations
    interleave at random, so a returning one often finds its prefix pushed out
    of device memory by the others. Token ids lie in [1, vocab).
    """
    systems = [rng.integers(1, vocab, system_tokens).tolist() for _ in range(system_prompts)]
    history = {c: list(systems[c % system_prompts]) for c in range(conversations)}
    left = {c: turns for c in range(conversations)}
    events = []
    while left:
        c = int(rng.choice(sorted(left)))
        prompt = history[c] + rng.integers(1, vocab, user_tokens).tolist()
        reply = rng.integers(1, vocab, reply_tokens).tolist()
        events.append((c, prompt, reply))
        history[c] = prompt + reply
        left[c] -= 1
        if not left[c]:
            del left[c]
    return events
