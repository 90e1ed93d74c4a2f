"""DP-SGD, privacy ledger, audits and protected storage (to come)."""
