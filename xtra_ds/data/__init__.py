"""Data: the shard format shared with data_prep/, and (next) the streaming loader."""
