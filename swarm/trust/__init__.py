"""Trusting servers less: spot-checks of their outputs against independent servers, and bans; and
who may join: node identities and private swarms' keys."""
