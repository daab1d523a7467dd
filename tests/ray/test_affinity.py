"""The routing decision without a cluster: the prefix chain of a request, the affinity table and the choice.

* :func:`prefix_chain` matches the engine's prefix cache: one entry per full block, equal leading entries
  exactly for equal leading blocks (and the same in another process: see test_options_and_files.py).
* :class:`PrefixKeyer` renders a chat request as the replica's serving code does (the same ``prepare``),
  so the chain is that of the pref context the engine will decode.
* :func:`preferred_replica`: the owner of the longest matching prefix unless busy; a new prefix goes to
  the least loaded replica owning the fewest blocks; no key (or every replica full): no preference.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from amulet_core.method.preference_prompts import Placement, preference_contexts, resolve_default_system_prompt
from amulet_core.model.chat_template import ChatTokenizer, render_chat
from amulet_ray.affinity import AffinityTable, ReplicaLoad, preferred_replica
from amulet_ray.prefix import PrefixKeyer, prefix_chain
from server.options import parse_args

pytestmark = pytest.mark.ray

SYSTEM = "You are a patient gardening expert. " * 6


def test_prefix_chain_has_one_entry_per_full_block_and_shares_exactly_the_equal_leading_blocks() -> None:
    a = list(range(100, 150))  # 50 tokens: 3 full blocks of 16, the partial 4th left out
    b = a[:32] + [7] * 18  # same first two blocks
    assert len(prefix_chain(a, 16)) == 3
    assert prefix_chain(a, 16)[:2] == prefix_chain(b, 16)[:2]
    assert prefix_chain(a, 16)[2] != prefix_chain(b, 16)[2]
    assert prefix_chain(a[:15], 16) == ()
    assert len(prefix_chain(list(range(5000)), 16, max_blocks=8)) == 8
    changed_first = [0, *a[1:]]
    assert all(x != y for x, y in zip(prefix_chain(a, 16), prefix_chain(changed_first, 16), strict=True))


def _chat(user: str, preference: Any = "concise", system: str = SYSTEM) -> bytes:
    body: dict[str, Any] = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    if preference is not None:
        body["preference"] = preference
    return json.dumps(body).encode()


def test_the_keyer_chains_the_pref_context_the_replica_decodes(smollm_tokenizer: Any) -> None:
    configs = parse_args([])
    renderer = ChatTokenizer(smollm_tokenizer)
    keyer = PrefixKeyer(renderer, "SmolLM2-135M-Instruct", configs)

    def chain(body: bytes, path: str = "/v1/chat/completions") -> tuple[int, ...]:
        return asyncio.run(keyer.chain("POST", path, body))

    basil, tides = chain(_chat("How do I keep basil alive?")), chain(_chat("Why are there tides?"))
    # The pref context (system message + the preference sentence), exactly as the serving code builds it.
    default = resolve_default_system_prompt(configs.server.default_system_prompt, renderer.template_system_prompt())
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How do I keep basil alive?"}]
    built = preference_contexts(messages, ["concise"], default, placement=configs.server.preference_placement)
    assert basil == prefix_chain(render_chat(smollm_tokenizer, built.prefs[0]), configs.engine.block_size)
    shared = sum(1 for x, y in zip(basil, tides, strict=False) if x == y)
    assert shared >= 3 and basil[:shared] == tides[:shared] and basil != tides
    # With the end placement (the default) the key is the conversation's own: another preference, whose sentence
    # only changes the last partial block, routes the same conversation to the same replica.
    assert configs.server.preference_placement is Placement.END
    assert chain(_chat("How do I keep basil alive?", preference="verbose")) == basil
    system = _chat("How do I keep basil alive?", preference={"text": "verbose", "placement": "system"})
    assert chain(system)[:1] == basil[:1] and chain(system) != basil  # same system prompt, other sentence there
    assert chain(_chat("How do I keep basil alive?", system="Something else entirely. " * 6))[0] != basil[0]
    # Bodies the replica refuses, other routes and methods: no key (balanced routing).
    assert chain(b"{not json") == ()
    assert chain(_chat("hi", preference={"text": "concise", "method": "nonsense"})) == ()
    assert chain(_chat("hi"), path="/tokenize") == ()
    assert asyncio.run(keyer.chain("GET", "/v1/chat/completions", b"")) == ()
    completion = chain(json.dumps({"prompt": SYSTEM + "Tides?", "max_tokens": 4}).encode(), "/v1/completions")
    assert len(completion) >= 2
    # Messages and Responses bodies key as the chat requests the replica makes of them.
    question = "How do I keep basil alive?"
    user = [{"role": "user", "content": question}]
    messages = {"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "system": SYSTEM, "messages": user}
    assert chain(json.dumps({**messages, "preference": "concise"}).encode(), "/v1/messages") == basil
    responses = {"instructions": SYSTEM, "input": question, "preference": "concise"}
    assert chain(json.dumps(responses).encode(), "/v1/responses") == basil
    continued = {**responses, "previous_response_id": "resp_1"}  # its conversation is in the replica's store
    assert chain(json.dumps(continued).encode(), "/v1/responses") == ()


def _loads(**ongoing: int | None) -> list[ReplicaLoad]:
    return [ReplicaLoad(name, value, capacity=8) for name, value in ongoing.items()]


def test_the_owner_of_the_longest_matching_prefix_is_preferred_while_it_is_not_busy() -> None:
    table = AffinityTable()
    table.record((1, 2, 3), "a")
    table.record((1, 2, 9, 10), "b")  # the last to serve blocks 1 and 2
    assert preferred_replica((1, 2, 3, 4), _loads(a=0, b=0), table, max_imbalance=2) == "a"  # 3 blocks match on a
    assert preferred_replica((1, 2, 7), _loads(a=0, b=0), table, max_imbalance=2) == "b"  # 2 blocks, served last by b
    assert preferred_replica((1, 2, 3), _loads(a=3, b=0), table, max_imbalance=2) is None  # a is 3 above b: busy
    assert preferred_replica((1, 2, 3), _loads(a=2, b=0), table, max_imbalance=2) == "a"
    assert preferred_replica((1, 2, 3), [ReplicaLoad("a", 8, 8), ReplicaLoad("b", 8, 8)], table, 100) is None  # full
    assert preferred_replica((1, 2, 3), _loads(b=0), table, max_imbalance=2) == "b"  # a is gone: b owns block 1..2


def test_a_new_prefix_goes_to_the_least_loaded_replica_owning_the_fewest_blocks() -> None:
    table = AffinityTable()
    table.record((1, 2, 3), "a")
    assert preferred_replica((50, 51), _loads(a=0, b=0), table, 8) == "b"
    assert preferred_replica((50, 51), _loads(a=0, b=1), table, 8) == "a"
    assert preferred_replica((50, 51), _loads(a=None, b=None), table, 8) == "b"  # unknown counts as idle
    assert preferred_replica((), _loads(a=0, b=0), table, 8) is None
    assert preferred_replica((1,), [], table, 8) is None


def test_the_table_is_bounded_and_forgets_removed_replicas() -> None:
    table = AffinityTable(capacity=4)
    table.record((1, 2, 3), "a")
    table.record((4, 5), "b")  # evicts block 1, the least recently recorded
    assert len(table) == 4 and table.owner((1,), {"a", "b"}) == (None, 0)
    assert table.blocks_of("a") == 2 and table.blocks_of("b") == 2
    table.record((2,), "b")
    assert table.owner((1, 2), {"a", "b"}) == ("b", 2) and table.blocks_of("a") == 1
    table.retain({"a"})
    assert table.blocks_of("b") == 0 and table.owner((4, 5), {"a", "b"}) == (None, 0) and len(table) == 1
    with pytest.raises(ValueError):
        AffinityTable(capacity=0)
