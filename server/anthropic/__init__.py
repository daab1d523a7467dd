"""The Anthropic Messages API (``POST /v1/messages``, and ``/v1/messages/count_tokens``) over the chat completions
machinery.

A Messages request is converted into a :class:`~server.protocol.ChatCompletionRequest` (:mod:`.conversion`) and
goes through the same preparation and admission as a chat request; the answer is written in Anthropic's shapes,
whole (:mod:`.answers`) or as Anthropic's SSE events (:mod:`.events`); errors on the route take Anthropic's error
object (:mod:`.errors`). The package imports nothing that imports it back: ``server.errors`` uses :mod:`.errors`.
"""
