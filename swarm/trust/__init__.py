"""Trusting servers less: spot-checks of their outputs against independent servers, and bans."""
