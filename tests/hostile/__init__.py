"""Hostile input on the data path: raw bytes from an attacker app or a broken upstream."""
