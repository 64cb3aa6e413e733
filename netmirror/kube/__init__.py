"""Kubernetes plumbing: reach an agent inside a pod through the API server.

:mod:`netmirror.kube.channels` decodes the ``v4.channel.k8s.io`` port-forward framing
without doing any I/O; :mod:`netmirror.kube.portforward` runs it over an aiohttp
websocket and serves it on a local Unix socket.
"""
