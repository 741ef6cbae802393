"""One station's traffic: session, call ledger, firewall gate, call timer, failover link."""
