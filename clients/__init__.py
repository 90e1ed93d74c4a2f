"""One hospital in the federation: the Flower ClientApp and the site's privacy gate in front of it.

Ingestion and the plain training loop are shared with the server and live in the ground
(:mod:`federation.ingest`, :mod:`federation.train`), the allow-list of fit metrics in
:mod:`federation.records`; DP-SGD and the site policy in :mod:`privacy`.
"""

from clients.client_app import HospitalClient, make_client_app, policy_gate

__all__ = ["HospitalClient", "make_client_app", "policy_gate"]
