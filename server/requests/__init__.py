"""From a request body to what the engine runs, one module per endpoint, each in four phases in order:

1. ``admit(body, admission) -> intent``: the request policy, the model, ``n``, tools, the grammar, the
   preference plan, SamplingParams and the fan-out budget (prompts x ``n`` x contexts, :mod:`.limits`). Pure
   and cheap: no tokenizer, no chat template. Every bad field is refused here with an InvalidParameterError
   (or APIError) naming it.
2. ``render(intent, renderer)``: the conversations (K preference contexts and the contrast one) as text,
   through the model's chat template.
3. ``encode(...)``: the texts as token ids; a text too long to fit the model's context is refused by
   its length in characters before the tokenizer runs (:mod:`.encoding`).
4. ``assemble(...) -> GenerationRequest``: the engine's request, with the context-length rule.

``prepare`` runs the four in order, rendering and encoding off the event loop on the server's bounded
preparation pool (:mod:`.preparation`: a 429 with Retry-After when it is full): the serving endpoints call
it, and so does the Ray ingress, to key a request by the prefix it will have. The helpers sit beside the
endpoints by what they do: :mod:`.policy` (unknown and unsupported fields), :mod:`.fields` (shared
fields to domain types), :mod:`.preference`, :mod:`.grammar`, :mod:`.tools` and :mod:`.json_values`
(JSON a client sends inside a field, read without recursion errors).
"""
