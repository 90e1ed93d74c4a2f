"""The privrad error hierarchy.

Every error the project raises on purpose derives from :class:`PrivradError`, so a
caller can catch the whole family at once and a CLI can print a clean message::

    PrivradError
    ├── ConfigError            a configuration value breaks a rule (names the field)
    ├── DataError              input data cannot be used (names the file)
    │   ├── DicomError         a DICOM file is unusable (names the tag where one is at fault)
    │   └── LabelError         a label is not in the class list
    ├── ModelError             a model file or architecture is unusable
    ├── PrivacyBudgetError     a step would exceed a privacy budget
    ├── PolicyRefusedError     a round asks for less privacy than the site's policy allows (names the rule)
    ├── VaultError             a vault object or keyring cannot be used: tampered, truncated, wrong key, unknown id
    └── HEError                encrypted inference cannot go on
        ├── UnsupportedLayerError  a layer has no CKKS equivalent (names the layer and why)
        ├── DepthError             the network is deeper than any 128-bit ring allows
        ├── KeyMaterialError       secret material where only public keys belong, or keys that do not match
        ├── CiphertextError        a ciphertext or artifact is malformed, tampered or for other parameters
        └── WorkerLostError        an HE worker process died during a request (the pool respawns it; retry)
"""

from __future__ import annotations

import re
from pathlib import Path


class PrivradError(Exception):
    """Base class of every error privrad raises on purpose."""


class ConfigError(PrivradError, ValueError):
    """A configuration value breaks a rule; the message names the field and the value."""


class DataError(PrivradError):
    """Input data cannot be used.

    Parameters
    ----------
    path
        The file or folder at fault, or ``None`` when the problem is not tied to one.
    problem
        What is wrong, in words a hospital engineer can act on.
    """

    def __init__(self, path: Path | str | None, problem: str) -> None:
        self.path = Path(path) if path is not None else None
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")


class DicomError(DataError):
    """A DICOM file cannot be used; ``tag`` names the attribute at fault, if one is."""

    def __init__(self, path: Path | str | None, problem: str, *, tag: str | None = None) -> None:
        self.tag = tag
        super().__init__(path, f"{tag} {problem}" if tag else problem)


class LabelError(DataError):
    """A label is not one of the known classes."""


class ModelError(PrivradError):
    """A model file or architecture cannot be used."""


class PrivacyBudgetError(PrivradError):
    """A DP step set would exceed the privacy budget."""


class PolicyRefusedError(PrivradError):
    """A site refuses a round: the coordinator asked for less than the site's privacy policy allows.

    Parameters
    ----------
    rule
        The policy rule at fault (a :class:`privacy.policy.Rule` value, e.g. ``"dp-required"``).
    problem
        What was asked and what the policy allows.
    """

    _FORMAT = re.compile(r"refused by site policy \[([a-z-]+)\]: ")

    def __init__(self, rule: str, problem: str) -> None:
        self.rule, self.problem = str(rule), problem
        super().__init__(f"refused by site policy [{self.rule}]: {problem}")

    @classmethod
    def rule_in(cls, text: str) -> str | None:
        """The rule a refusal's message (e.g. an error reply's reason) names; ``None`` if it is no refusal."""
        match = cls._FORMAT.search(text)
        return match.group(1) if match else None


class VaultError(PrivradError):
    """A vault object or keyring cannot be used: tampered, truncated, wrong key, unknown id."""


class HEError(PrivradError):
    """Encrypted inference cannot go on."""


class UnsupportedLayerError(HEError, ModelError):
    """A layer of the model has no CKKS equivalent; the message names the layer and why."""


class DepthError(HEError):
    """The network needs more multiplicative levels than a 128-bit-secure ring provides."""


class KeyMaterialError(HEError):
    """Secret material where only public material is allowed, or keys for other parameters."""


class CiphertextError(HEError):
    """A serialised ciphertext, key or compiled model is malformed, tampered or mismatched."""


class WorkerLostError(HEError):
    """An HE worker process died (killed, out of memory) while it served a request.

    The request cannot be answered; the pool respawns the worker and serves the next one,
    so a client may retry (the service answers 503).
    """
