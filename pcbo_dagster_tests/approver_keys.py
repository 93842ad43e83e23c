"""Approvers' keys for the rollout tests: fixed seeds, so a config can list their verifier keys.

`BO` and `CY` are the listed approvers of the tests' configs (`APPROVERS_YAML`); `MALLORY` is not
listed. Test keys only: their seeds are in this file."""

from __future__ import annotations

from pathlib import Path

from pcbo_dagster.core.signed_note import SigningKey, signing_key_from_seed

BO = signing_key_from_seed("approvers.example/bo", bytes([11]) * 32)
CY = signing_key_from_seed("approvers.example/cy", bytes([12]) * 32)
MALLORY = signing_key_from_seed("approvers.example/mallory", bytes([13]) * 32)

#: The `rollout:` lines listing BO and CY (indent them to the rollout block's level).
APPROVERS_YAML = f'approvers: ["{BO.verifier().text}", "{CY.verifier().text}"]'


def key_file(directory: Path, key: SigningKey) -> Path:
    """The key written to `<directory>/<short name>.key`, mode 0600."""
    path = directory / (key.name.rsplit("/", 1)[-1] + ".key")
    if not path.exists():
        path.write_text(key.text + "\n")
        path.chmod(0o600)
    return path


def list_approvers_in_example(config: Path) -> None:
    """Make BO and CY the approvers of the rollout in a copy of the example datasets config."""
    text = config.read_text()
    marker = "    rollout:"
    at = text.index(marker)
    end = text.index("\n", at) + 1
    config.write_text(text[:end] + "      " + APPROVERS_YAML + "\n" + text[end:])
