"""Privacy at the hospital: the site policy, DP-SGD rounds, the ledger, audits and protected storage."""
