"""The alerts domain: the sensor raising an alert for every failed check and run."""
