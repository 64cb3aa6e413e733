"""Mirror mode in the agent: copies of client bytes, never in the traffic's way.

Two methods, per port:

- **capture** (:class:`~.capture.CaptureMirror`): an AF_PACKET socket reads a copy of the
  packets; the reassembler rebuilds each connection's client bytes. No rule is in
  the traffic path, so the target is unaffected even if the agent dies.
- **passthrough** (:class:`~.passthrough.PassthroughBridge`): a REDIRECT rule sends connections
  to the agent, which relays them to the original server and copies the client's
  bytes.

Either way a copy goes to the daemon as a stream (:class:`~.copy.MirrorCopy`) that holds
at most ``MAX_PENDING`` bytes: when the daemon or the local process is slower than
the real traffic, the copy is dropped and counted; the real traffic is never
slowed down for it.
"""
