"""Evidence packages: an in-toto Statement v1 about one run, in a DSSE envelope signed with the
operator's key (`export`), and its offline verification (`verify`)."""
