"""Credentials never reach disk: `saved_config_dict` (what `save_config` writes) replaces the credential
values of every `*storage_options` mapping with `CREDENTIAL_MARKER`, and loading a config drops the marker
again (`drop_credential_markers`), so credentials then come from the environment (AWS_ACCESS_KEY_ID, ...)
or explicit overrides."""

from __future__ import annotations

import dataclasses
import typing

if typing.TYPE_CHECKING:
    from cellfm.config.schema import Config

# What a saved config holds in place of a credential. Loading drops it (credentials then come from
# the environment), so the marker is never sent to a store as a credential.
CREDENTIAL_MARKER = "<redacted>"
# A storage option whose name contains one of these is a credential (s3fs: key, secret, token;
# botocore's client_kwargs: aws_access_key_id, aws_secret_access_key, aws_session_token; ...).
_CREDENTIAL_NAME_PARTS = ("secret", "token", "password", "key", "credential", "session")


def saved_config_dict(cfg: Config) -> dict:
    """`cfg.to_dict()` fit to be written or shown anywhere: in every `*storage_options` mapping the
    credential values (`is_credential_key`) are `CREDENTIAL_MARKER`, the other keys kept."""
    out = cfg.to_dict()
    for section in out.values():
        for name, value in section.items():
            if name.endswith("storage_options") and isinstance(value, dict):
                section[name] = redact_credentials(value)
    return out


def is_credential_key(name: str) -> bool:
    """Whether a storage option of this name holds a credential (key, secret, token, password,
    session token, aws_* keys, ...)."""
    lowered = str(name).lower()
    return any(part in lowered for part in _CREDENTIAL_NAME_PARTS)


def redact_credentials(options: dict) -> dict:
    """A copy of `options` (nested mappings too, e.g. client_kwargs) with credential values replaced
    by `CREDENTIAL_MARKER`."""
    return {k: redact_credentials(v) if isinstance(v, dict)
            else CREDENTIAL_MARKER if is_credential_key(k) and v not in (None, "") else v
            for k, v in options.items()}


def _without_markers(options: dict) -> dict:
    return {k: _without_markers(v) if isinstance(v, dict) else v
            for k, v in options.items() if v != CREDENTIAL_MARKER}


def drop_credential_markers(cfg: Config) -> None:
    """A loaded saved config carries markers, not credentials: drop them, so the credentials come
    from the environment (or from explicit `data.storage_options.*` overrides)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if f.name.endswith("storage_options") and isinstance(value, dict):
                setattr(sub, f.name, _without_markers(value))

