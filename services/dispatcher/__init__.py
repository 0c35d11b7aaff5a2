"""The dispatcher: dramatiq actors that snapshot audiences and send to each recipient."""
