"""A sharded replica: a group of ranks serving one model over MLX's ``ring`` backend.

:mod:`workers.shard.engine` (rank 0's engine and the group's forming), :mod:`workers.shard.channel`
(the op channel and the watch), :mod:`workers.shard.follower` (the other ranks).
"""
