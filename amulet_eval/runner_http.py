"""The HTTP runner: the same jobs through a running Amulet Serve's OpenAI API (``--base-url``), cfg included."""

from __future__ import annotations

from typing import Any

from amulet_core.method.settings import Method
from amulet_eval.config import CFG_METHOD, GenerationConfig, HttpBackend
from amulet_eval.generate import Generated, GenerationError, Job, conversation
from amulet_eval.openai_http import ChatClient, HttpCallError


def preference_object(job: Job) -> dict[str, Any]:
    """The request's ``preference`` field: the preference (a list with ``weights`` for a joined condition), the
    contrast context's ``negative`` when the column has one, and every setting of the method, spelled out."""
    settings = job.method.engine_settings
    condition = job.condition
    text: str | list[str] = list(condition.texts) if condition.joined else condition.texts[0]
    spec: dict[str, Any] = {"text": text, "method": job.method.kind, "mode": settings.mode.value}
    if condition.joined:
        spec["weights"] = list(condition.weights)
    if settings.method.has_contrast:
        if job.method.negative is not None:
            spec["negative"] = job.method.negative
        spec["plausibility"] = settings.plausibility
        if settings.strength is not None:
            spec["coefficient"] = settings.strength
        elif settings.method is Method.LA:
            spec["ratio"] = settings.ratio
        else:
            spec.update(iterations=settings.iterations, eta=settings.eta, alpha=settings.alpha)
            spec["lambda"] = settings.lam
    return spec


def method_fields(job: Job) -> dict[str, Any]:
    """The request fields that choose the decoding: ``preference``, or for cfg ``guidance_scale`` and
    ``negative_prompt`` (the server refuses both at once; cfg ignores the row's preference)."""
    if job.method.kind == CFG_METHOD:
        return {"guidance_scale": job.method.engine_settings.strength, "negative_prompt": job.method.negative}
    return {"preference": preference_object(job)}


class HttpRunner:
    """Sends each job as one chat completion; the server decodes it (beam16 is not available here)."""

    serial_kinds: frozenset[str] = frozenset()

    def __init__(self, backend: HttpBackend, generation: GenerationConfig) -> None:
        self.backend = backend
        self.generation = generation
        self._client: ChatClient | None = None
        self._model: str | None = backend.model

    def _new_client(self) -> ChatClient:
        return ChatClient(self.backend.base_url, self.backend.api_key, self.backend.timeout_s)

    async def resolve_model_name(self) -> str:
        if self._model is None:
            client = self._new_client()
            try:
                self._model = await client.model_name()
            except HttpCallError as exc:
                raise GenerationError(f"Cannot reach the server at {self.backend.base_url}: {exc}") from exc
            finally:
                await client.aclose()
        return self._model

    async def start(self) -> None:
        self._client = self._new_client()

    async def generate(self, job: Job) -> Generated:
        if self._client is None:
            raise RuntimeError("the runner is not started")
        gen = self.generation
        body = {
            "model": await self.resolve_model_name(),
            "messages": conversation(gen.system_prompt, job.question.question),
            **method_fields(job),
            "temperature": gen.temperature,
            "max_tokens": gen.max_tokens,
            "seed": gen.seed,
        }
        try:
            choice = await self._client.complete(body)
        except HttpCallError as exc:
            raise GenerationError(f"The server failed on {job.key}: {exc}") from exc
        tokens = int(choice["usage"].get("completion_tokens") or 0)
        return Generated(str(choice["message"]["content"] or ""), tokens, str(choice.get("finish_reason")))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
