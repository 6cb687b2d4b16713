"""The multi-turn trace of bench/vllm_connector.py, as plain token ids (no engine needed to build it).

`conversations` chats share one system prompt; turn t of a chat is its
previous turn's prompt plus the assistant's reply and the user's next
message, so each turn's prompt extends the last one. Replies are fixed
tokens of the trace (not what a model sampled), so any engine, any model and
any connector replay exactly the same prompts. Each request also generates
`reply_tokens` tokens, which no later prompt uses.
"""

from __future__ import annotations

import argparse

import numpy as np


def add_arguments(p: argparse.ArgumentParser, *, host_blocks: int) -> None:
    """The trace's command-line options (and the host budget in blocks), the same in every script replaying it."""
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-tokens", type=int, default=256)
    p.add_argument("--user-tokens", type=int, default=64)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--host-blocks", type=int, default=host_blocks, help="host memory budget, in blocks")


def from_arguments(args: argparse.Namespace, vocab: int = 1000) -> list[list[tuple[str, list[int]]]]:
    """`multi_turn` as the options of `add_arguments` say."""
    return multi_turn(
        args.conversations,
        args.turns,
        system_tokens=args.system_tokens,
        user_tokens=args.user_tokens,
        reply_tokens=args.reply_tokens,
        vocab=vocab,
    )


def multi_turn(
    conversations: int,
    turns: int,
    *,
    system_tokens: int,
    user_tokens: int,
    reply_tokens: int,
    vocab: int = 1000,
    seed: int = 0,
) -> list[list[tuple[str, list[int]]]]:
    """`trace[t]`: (request id, prompt token ids) of every conversation's turn t; turns run one after another."""
    rng = np.random.default_rng(seed)
    system = rng.integers(1, vocab, system_tokens).tolist()
    prompts = [list(system) for _ in range(conversations)]
    trace = []
    for t in range(turns):
        turn = []
        for c in range(conversations):
            if t:
                prompts[c] += rng.integers(1, vocab, reply_tokens).tolist()  # the assistant's previous reply
            prompts[c] += rng.integers(1, vocab, user_tokens).tolist()
            turn.append((f"chat{c}-turn{t}", list(prompts[c])))
        trace.append(turn)
    return trace
