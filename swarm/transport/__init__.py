"""py-libp2p's TCP, noise and yamux stack as the swarm runs it (`tuning.install`)."""
