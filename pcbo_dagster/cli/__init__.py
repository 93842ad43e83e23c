"""The `pcbo` command: `main.py` (the engine commands and the parser), `rollout_commands.py`
(`pcbo rollout …`, `approve`, `reject`) and `common.py` (what both share: options, input, output)."""
