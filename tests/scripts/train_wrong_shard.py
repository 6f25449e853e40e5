"""The train command with every process reading process 0's shard: a deliberately wrong
shard, so that the test comparing multi-process training with one process can be seen
to fail when the sharding is wrong."""

import sys

import convmixer_tf.pipelines as pipelines

right = pipelines.shard_of_epoch
pipelines.shard_of_epoch = lambda order, global_batch, shard: right(
    order, global_batch, pipelines.Shard(0, shard.count)
)

from convmixer_tf.train.__main__ import main  # noqa: E402

sys.exit(main())
