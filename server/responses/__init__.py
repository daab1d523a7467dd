"""OpenAI's Responses API (``POST /v1/responses`` and the stored responses' routes) over the chat path.

* :mod:`server.responses.protocol`: the request, as the official SDK sends it, every list capped;
* :mod:`server.responses.items`: input items in the stored shape, and items as chat messages;
* :mod:`server.responses.chat_request`: the request's own unsupported fields, and the request as a
  :class:`~server.protocol.ChatCompletionRequest` (our fields, ``preference`` ..., pass through as on chat);
* :mod:`server.responses.answer`: output items (a reasoning model's thinking first) and the response object;
* :mod:`server.responses.reasoning`: the thinking's tokens, counted as the answer comes;
* :mod:`server.responses.events`: the SSE events of a streamed response;
* :mod:`server.responses.serving`: the endpoint (the chat's preparation, the engine, the store);
* :mod:`server.responses.routes`: its routes on the app.
"""
