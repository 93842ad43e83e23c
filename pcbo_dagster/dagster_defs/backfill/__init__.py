"""The backfill domain: one partitioned asset per configured dataset, its checks, the `pcbo_request`
and checks-only jobs, and the open-ended ledger partitions sensor."""
