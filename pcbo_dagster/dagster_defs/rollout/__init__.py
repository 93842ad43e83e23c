"""The staged-rollout domain: staging and production assets, the soak check and schedule, the
rollout jobs (control, approval, rollback, health) and the promotion sensor."""
