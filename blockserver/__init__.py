"""The block server process: serves a span of layers to the swarm (a handler per protocol), places and moves it."""
