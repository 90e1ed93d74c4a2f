"""The hospital's side of the encrypted-inference service: encrypt → post → decrypt.

The secret key stays in the client's key folder; the service gets the public evaluation keys
once (it answers a key id) and then only ciphertexts.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from federation.errors import HEError
from he_inference.compiler import ClientModel
from he_inference.keys import SECRET_FILE, SecretKeys
from he_inference.server import decrypt_logits, encrypt_image, prediction

__all__ = ["ServiceClient"]

OCTET = "application/octet-stream"


class ServiceClient:
    """A connection to one encrypted-inference service, with this hospital's keys."""

    def __init__(self, url: str, keys_dir: Path, *, ca_cert: Path | None = None, timeout: float = 900.0) -> None:
        verify: bool | ssl.SSLContext = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
        self.http = httpx.Client(base_url=url.rstrip("/"), verify=verify, timeout=timeout)
        self.model = ClientModel.from_dict(self._check(self.http.get("/model"), "GET /model").json())
        keys_dir = Path(keys_dir)
        if (keys_dir / SECRET_FILE).is_file():
            self.keys = SecretKeys.load(keys_dir, self.model.params)
        else:  # first contact: make this hospital's keys for the served model
            self.keys = SecretKeys.generate(self.model.params, self.model.steps)
            self.keys.save(keys_dir)
        reply = self.http.post("/keys", content=self.keys.public_bytes(), headers={"content-type": OCTET})
        self.key_id = str(self._check(reply, "POST /keys").json()["key_id"])

    @staticmethod
    def _check(reply: httpx.Response, what: str) -> httpx.Response:
        if reply.status_code >= 400:
            try:
                body = reply.json()
                detail = f"{body.get('error')}: {body.get('detail')}"
            except ValueError:
                detail = reply.text[:200]
            raise HEError(f"{what} refused ({reply.status_code}) — {detail}")
        return reply

    def classify(self, image: np.ndarray) -> dict[str, Any]:
        """One image (C, H, W) in [0, 1] → probabilities, logits, sizes and timings."""
        t0 = time.perf_counter()
        upload = encrypt_image(self.model, self.keys, image)
        reply = self._check(self.http.post(f"/infer/{self.key_id}", content=upload, headers={"content-type": OCTET}),
                            "POST /infer")
        logits = decrypt_logits(self.model, self.keys, reply.content, source="service reply")
        return {**prediction(logits, self.model.classes),
                "server_s": float(reply.headers.get("X-Privrad-Seconds", "nan")),
                "round_trip_s": time.perf_counter() - t0, "upload_bytes": len(upload),
                "download_bytes": len(reply.content)}

    def classify_files(self, paths: Sequence[Path]) -> list[dict[str, Any]]:
        """DICOM slices (or .npy arrays), preprocessed as the model was trained."""
        from he_inference.check import read_image

        return [{"image": str(p), **self.classify(read_image(p, self.model.meta.get("preprocess", {})))}
                for p in paths]

    def close(self) -> None:
        """Close the HTTP connection."""
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
