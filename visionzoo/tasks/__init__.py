"""Training tasks: what differs per kind of work. Each plugs into the one loop, ``visionzoo.engine.loop.fit``."""
