"""Witnesses (c2sp.org/tlog-witness): the client that asks a witness to cosign a checkpoint, and a
small witness server (`pcbo witness serve`)."""
