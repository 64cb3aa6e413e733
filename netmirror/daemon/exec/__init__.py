"""What the daemon adds for ``netmirror exec``: the command's outgoing traffic.

:mod:`.outgoing` listens for the connections the cgroup's rules redirect and turns
each into a stream the agent connects from the target; :mod:`.dns` answers the
command's DNS queries with the target's resolver; :mod:`.proxy` reads proxy
greetings where transparent redirection is impossible.
"""
