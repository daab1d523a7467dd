"""From a chat request's ``preference`` (a string, a list, or the object form) or its classifier-free
guidance fields (``guidance_scale``, ``negative_prompt``) to what the engine decodes: the preference
texts, their weights, the contrast context's negative text, and the MethodSettings.

The HTTP layer only translates shapes here; the rules (weights finite and positive, the method's
parameters, A set directly) are MethodSettings'. Errors name the request's field.

Placement (where the sentences go, :class:`Placement`): the object form's ``placement`` when given;
else ``system`` for ``"mode": "paper"`` (the paper's prompts exactly, whatever the server's default);
else the server's default (``--preference-placement``), which a string or list preference and
classifier-free guidance (its negative sentence) take too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from amulet_core.errors import InvalidParameterError
from amulet_core.method.preference_prompts import Placement
from amulet_core.method.settings import Method, MethodSettings, Mode, api_name
from server.protocol import ChatCompletionRequest, PreferenceItem, PreferenceList, PreferenceSpec

Preference = str | PreferenceList | PreferenceSpec
"""What the ``preference`` field takes."""
CFG_MODE = "cfg"
"""The echo's ``mode`` for classifier-free guidance."""


@dataclass(frozen=True)
class PreferencePlan:
    """What a request's preference fields ask for."""

    texts: tuple[str, ...]
    """Preference presets or sentences, one per preference context (empty for guidance: the preference
    context is then the conversation as given)."""
    negative: str | None
    """What the contrast context carries, or None (the conversation as given)."""
    settings: MethodSettings
    mode: str
    """The echo's mode: the settings' (``default``, ``paper``) or ``cfg``."""
    placement: Placement
    """Where the sentences (and the negative one) go in their contexts."""


def _weight(value: float | None, param: str) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise InvalidParameterError(param, f"'{param}' must be a finite number above 0, got {value!r}.")
    return float(value)


def _items(items: list[str | PreferenceItem], param: str, max_preferences: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if not items:
        raise InvalidParameterError(param, f"'{param}' must name at least one preference.")
    if len(items) > max_preferences:
        raise InvalidParameterError(
            param, f"'{param}' takes at most {max_preferences} preferences (--max-preferences), got {len(items)}."
        )
    texts, weights = [], []
    for i, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
            weights.append(1.0)
        else:
            texts.append(item.text)
            weights.append(_weight(item.weight, f"{param}[{i}].weight"))
    return tuple(texts), tuple(weights)


def _settings(fields: dict[str, object], mode: Mode, param: str) -> MethodSettings:
    try:
        return MethodSettings.from_fields(fields, mode)
    except InvalidParameterError as exc:
        name = api_name(exc.param)
        raise InvalidParameterError(f"{param}.{name}" if param else name, exc.message) from exc


def _from_spec(spec: PreferenceSpec, max_preferences: int, default_placement: Placement) -> PreferencePlan:
    if spec.profile is not None:  # resolved before admission (OpenAIServing.resolve_profile) wherever profiles are kept
        raise InvalidParameterError("preference.profile", "This server keeps no preference profiles here.")
    if spec.text is None:
        raise InvalidParameterError("preference.text", "'preference.text' is required (or a 'profile' that gives it).")
    given = spec.text
    listed = not isinstance(given, str)
    texts, weights = _items([given] if isinstance(given, str) else given, "preference.text", max_preferences)
    if spec.weights is not None:
        if not listed or any(isinstance(i, PreferenceItem) and i.weight is not None for i in given):
            raise InvalidParameterError(
                "preference.weights", "'weights' goes with a list of preferences in 'text' that carry no weight of their own."
            )
        if len(spec.weights) != len(texts):
            raise InvalidParameterError(
                "preference.weights", f"'weights' needs one weight per preference: {len(texts)}, got {len(spec.weights)}."
            )
        weights = tuple(_weight(w, f"preference.weights[{i}]") for i, w in enumerate(spec.weights))
    fields: dict[str, object] = dict(spec.method_fields())
    if len(texts) > 1:
        fields["weights"] = weights
    settings = _settings(fields, Mode(spec.mode or Mode.DEFAULT), "preference")
    if spec.negative is not None and settings.method not in (Method.AMULET, Method.LA):
        raise InvalidParameterError(
            "preference.negative", "'negative' is the contrast context of amulet and la; this method decodes none."
        )
    if spec.placement is not None:
        placement = Placement(spec.placement)
    else:
        placement = Placement.SYSTEM if settings.mode is Mode.PAPER else default_placement
    return PreferencePlan(texts, spec.negative, settings, settings.mode.value, placement)


def preference_plan(body: ChatCompletionRequest, max_preferences: int, default_placement: Placement) -> PreferencePlan | None:
    """The request's plan, or None when it decodes plainly (no preference, no guidance). ``default_placement``
    is the server's (``--preference-placement``), for a request that does not say (see the module docstring).
    The ``end`` placement needs a user message to append to (a 400 naming ``preference.placement``)."""
    plan = _plan(body, max_preferences, default_placement)
    if plan is not None and plan.placement is Placement.END and not any(m.role == "user" for m in body.messages):
        chosen = isinstance(body.preference, PreferenceSpec) and body.preference.placement is not None
        source = "" if chosen else " (the server's default, --preference-placement)"
        hint = "; the preference object's 'placement': 'system' puts it in the system message" if body.preference else ""
        raise InvalidParameterError(
            "preference.placement",
            f"The 'end' placement{source} appends the preference to the last user message, and the conversation has none{hint}.",
        )
    return plan


def _plan(body: ChatCompletionRequest, max_preferences: int, default_placement: Placement) -> PreferencePlan | None:
    cfg = body.guidance_scale is not None or body.negative_prompt is not None
    if cfg and body.preference is not None:
        raise InvalidParameterError(
            "guidance_scale",
            "Use either 'preference' (Amulet) or 'guidance_scale' with 'negative_prompt' (classifier-free guidance), not both.",
        )
    if cfg:
        scale = body.guidance_scale
        if scale is None:
            raise InvalidParameterError("guidance_scale", "'negative_prompt' needs 'guidance_scale' (1 is plain decoding).")
        if isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
            raise InvalidParameterError("guidance_scale", f"'guidance_scale' must be a finite number >= 0, got {scale!r}.")
        if not body.negative_prompt:
            raise InvalidParameterError("negative_prompt", "'guidance_scale' needs a 'negative_prompt' for the contrast context.")
        settings = _settings({"method": "la", "strength": scale, "plausibility": 0.0}, Mode.DEFAULT, "")
        return PreferencePlan((), body.negative_prompt, settings, CFG_MODE, default_placement)
    if body.preference is None:
        return None
    return plan_of(body.preference, max_preferences, default_placement)


def plan_of(preference: Preference, max_preferences: int, default_placement: Placement) -> PreferencePlan:
    """The plan of a ``preference`` value alone (a string, a list or the object form), with its errors naming
    ``preference...``; what a request's preference and a stored profile's are both checked by."""
    if isinstance(preference, str):
        return PreferencePlan((preference,), None, MethodSettings(), Mode.DEFAULT.value, default_placement)
    if isinstance(preference, list):
        texts, weights = _items(preference, "preference", max_preferences)
        settings = _settings({"weights": weights} if len(texts) > 1 else {}, Mode.DEFAULT, "preference")
        return PreferencePlan(texts, None, settings, settings.mode.value, default_placement)
    return _from_spec(preference, max_preferences, default_placement)
