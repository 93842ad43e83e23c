"""Configured datasets: the datasets YAML (`config.py`), engine requests for partition keys of a
dataset (`requests.py`, shared by Dagster, rollouts and the CLI) and the demo sources (`demo_data.py`)."""
