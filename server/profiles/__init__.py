"""Stored preference profiles (``/v1/preference_profiles``): a person's preference kept on the server under a name,
used by any generation request as ``"preference": {"profile": "<id or name>", ...}``.

* :mod:`server.profiles.protocol`: the request bodies (with their size limits) and the profile object answered;
* :mod:`server.profiles.values`: a preference as stored (JSON) and back, and a request's fields over a profile's;
* :mod:`server.profiles.service`: :class:`PreferenceProfiles`, the CRUD (every preference checked by the code that
  checks a request's, :func:`server.requests.preference.plan_of`) and the resolution of a request's profile;
* :mod:`server.profiles.routes`: the routes.

The rows are :class:`server.store.profiles.ProfileStore`'s, on the server's database, each owned by the API key's
tenant that made it (another key's profile is not found).
"""
