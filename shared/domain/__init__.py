"""Domain rules: lifecycle, audience, channels, broadcasts, contacts, media, tokens."""
